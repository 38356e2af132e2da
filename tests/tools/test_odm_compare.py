"""tools/odm_compare.py: the three recipes share one start, and a two-step run of the whole
loop (train in a subprocess, score the saved model, write the table)."""

from __future__ import annotations

import json
import re

import pytest
import torch


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("odm_compare")


@pytest.mark.parametrize("bits", [4, 2])
def test_the_methods_share_one_start(tool, bits):
    start = tool.common_start(bits)
    assert start.method == "uniform" and start.weights.bits == start.activations.bits == bits
    assert start.pipeline_spec == "trace,observe,calibrate,quantize,verify"
    for method, extra in (("odm-v1", "inject-offsets"), ("odm-v2", "wcc")):
        recipe = tool.method_recipe(start, method)
        assert (recipe.weights, recipe.activations, recipe.calibration) == \
            (start.weights, start.activations, start.calibration)
        assert recipe.method == "odm" and recipe.options.version == method[-2:]
        assert recipe.pipeline_spec == f"{start.pipeline_spec},{extra}"
    assert tool.method_recipe(start, "qat") is start


def test_the_method_copies_start_where_qat_does(tool, tiny_sr, calib):
    """A method's model is the start plus one pass: v1's identity offsets leave its outputs
    equal to the start's; the copies save, reload with their method, and the start is kept."""
    import fxquant

    start = tool.common_start(4)
    gm = fxquant.compile(tiny_sr, start, calib=calib)
    x = calib[:2]
    with torch.no_grad():
        before = gm(x)
    v1 = fxquant.transformed_copy(gm, "inject-offsets", calib=calib,
                                  recipe=tool.method_recipe(start, "odm-v1"))
    with torch.no_grad():
        torch.testing.assert_close(v1(x), before, rtol=0, atol=1e-6)
        assert torch.equal(gm(x), before)
    assert v1.fxquant_recipe.method == "odm" and gm.fxquant_recipe is start
    assert v1.fxquant_pipeline.endswith(",inject-offsets")


def test_a_copy_may_not_change_the_quantization(tool, tiny_sr, calib):
    import fxquant

    gm = fxquant.compile(tiny_sr, tool.common_start(4), calib=calib)
    with pytest.raises(fxquant.FxquantError, match=r"differs .* in \[weights, activations\]"):
        fxquant.transformed_copy(gm, "wcc", recipe=tool.common_start(2))


def test_a_two_step_comparison_writes_its_table(tool, data, tmp_path):
    md = tmp_path / "odm.md"
    md.write_text("# ODM\n\n## Other\n\nkept\n")
    argv = ["--out", str(tmp_path / "runs"), "--models", "fsrcnn", "--bits", "4",
            "--methods", "qat,odm-v2", "--steps", "2", "--batch-size", "2", "--patch", "16",
            "--device", "cpu", "--eval-sets", "Set5", "--eval-limit", "1",
            "--json", str(tmp_path / "rows.json"), "--write", str(md),
            "--store", str(tmp_path / "odm.json")]
    assert tool.main(argv) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    cells = json.loads((tmp_path / "odm.json").read_text())  # results-store cells
    assert sorted(cells) == ["fsrcnn|x4|odm-v2@qat-w4a4-common|Set5|1",
                             "fsrcnn|x4|qat@qat-w4a4-common|Set5|1"]
    cell = cells["fsrcnn|x4|qat@qat-w4a4-common|Set5|1"]
    assert cell["psnr"] == rows[0]["quant"]["Set5"] and 0 < cell["ssim"] < 1
    assert cell["command"].startswith("python tools/odm_compare.py --out")
    assert [(r["method"], r["bits"], r["start_recipe"]) for r in rows] == \
        [("qat", 4, "qat-w4a4-common"), ("odm-v2", 4, "qat-w4a4-common")]
    assert all(r["quant"]["Set5"] < r["fp"]["Set5"] for r in rows)
    text = md.read_text()
    assert "## Other\n\nkept" in text
    assert "| fsrcnn ×4 | W4A4 | `qat-w4a4-common` (" in text and "| odm-v2 |" in text
    assert (tmp_path / "runs" / "fsrcnn-x4-qat-w4a4-common-odm-v2.fxq").exists()
    # each run trained with its method's hooks: ODM's regularizer only in odm-v2's log
    logs = {m: (tmp_path / "runs" / f"fsrcnn-x4-qat-w4a4-common-{m}" / "metrics.jsonl")
            .read_text() for m in ("qat", "odm-v2")}
    assert "odm_mismatch" in logs["odm-v2"] and "odm_mismatch" not in logs["qat"]
    assert "| minutes |" in text and all(r["seconds"] > 0 for r in rows)

    # a second call with the same --json keeps those rows and trains only what is missing
    (tmp_path / "runs" / "fsrcnn-x4-qat-w4a4-common-qat" / "model.fxq").unlink()
    argv[argv.index("qat,odm-v2")] = "qat,odm-v1,odm-v2"
    assert tool.main(argv + ["--channels-last"]) == 0
    again = json.loads((tmp_path / "rows.json").read_text())
    assert again[:2] == rows and [r["method"] for r in again] == ["qat", "odm-v2", "odm-v1"]
    assert not (tmp_path / "runs" / "fsrcnn-x4-qat-w4a4-common-qat" / "model.fxq").exists()
    assert again[2]["fp"] == rows[0]["fp"]
    # each row keeps the layout and the command it was trained with, in the table and the store
    assert [r["layout"] for r in again] == ["nchw", "nchw", "channels-last"]
    cells = json.loads((tmp_path / "odm.json").read_text())
    assert "--channels-last" in cells["fsrcnn|x4|odm-v1@qat-w4a4-common|Set5|1"]["command"]
    assert "--channels-last" not in cells["fsrcnn|x4|qat@qat-w4a4-common|Set5|1"]["command"]
    table = [line for line in md.read_text().splitlines() if line.startswith("| fsrcnn")]
    marked = {line.split(" | ")[3]: "(channels-last)" in line for line in table}
    assert marked == {"qat": False, "odm-v1": True, "odm-v2": False}

    # distillation from the float model is a row of its own beside plain QAT's, not skipped
    argv[argv.index("qat,odm-v1,odm-v2")] = "qat"
    assert tool.main(argv + ["--hr-weight", "0", "--teacher-weight", "1"]) == 0
    distil = json.loads((tmp_path / "rows.json").read_text())[3]
    assert (distil["method"], distil["objective"]) == ("qat", "+distil")
    log = (tmp_path / "runs" / "fsrcnn-x4-qat-w4a4-common-qat+distil" / "metrics.jsonl").read_text()
    assert '"teacher"' in log and '"recon"' not in log
    cells = json.loads((tmp_path / "odm.json").read_text())
    assert "--hr-weight 0" in cells["fsrcnn|x4|qat+distil@qat-w4a4-common|Set5|1"]["command"]
    assert "| qat+distil |" in md.read_text()


@pytest.mark.parametrize("hr, teacher, qlr, suffix", [
    (1, 0, 1, ""), (0, 1, 1, "+distil"), (1, 0.5, 1, "+teacher"), (2, 0, 1, "+hr2"),
    (0, 1, 0, "+distil+qlr0"), (1, 0, 10, "+qlr10")])
def test_objectives_are_named(tool, hr, teacher, qlr, suffix):
    assert tool.objective(hr, teacher, qlr) == suffix
    assert tool.objective(hr, teacher, qlr, 1e-4) == suffix  # fxquant train's default rate
    assert tool.objective(hr, teacher, qlr, 2e-4) == suffix + "+lr0.0002"
    assert tool.method_of({"method": "qat", "objective": suffix}) == "qat" + suffix
    assert tool.method_of({"method": "odm-v2"}) == "odm-v2"  # rows from before objectives


def test_an_unknown_method_is_named(tool, tmp_path, capsys):
    assert tool.main(["--out", str(tmp_path), "--methods", "qat,odm-v3"]) == 2
    assert "unknown method(s) odm-v3; valid: qat, odm-v1, odm-v2" in capsys.readouterr().err


def test_a_non_uniform_start_is_refused_for_odm_only(tool, tmp_path, capsys):
    assert tool.main(["--out", str(tmp_path), "--start", "i2nq-w4a4", "--models", "nope",
                      "--methods", "qat,odm-v2"]) == 2
    err = capsys.readouterr().err
    assert "method 'i2nq' is not a uniform PTQ start, which odm-v2 build on" in err
    assert "--methods qat" in err


@pytest.mark.data
def test_a_misspelt_eval_set_is_named_before_any_compile(tool, data, tmp_path, capsys,
                                                         monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("--eval-sets must be checked before the start is built")

    monkeypatch.setattr(tool, "build_start", no_work)
    assert tool.main(["--out", str(tmp_path), "--models", "imdn", "--methods", "qat",
                      "--eval-sets", "Set5,Set6", "--data", str(data)]) == 2
    assert "benchmark set 'Set6' not found" in capsys.readouterr().err


@pytest.mark.data
@pytest.mark.parametrize("flag, content, message", [
    ("--json", "{not json", "--json .* cannot be read as rows"),
    ("--json", '[{"model": "imdn"}]', "--json .* is not a list of rows this tool wrote"),
    ("--store", "[1, 2]", "is not a results store"),
    ("--write", None, "folder .* does not exist"),
])
def test_outputs_that_would_fail_after_the_runs_fail_before_them(tool, data, tmp_path, capsys,
                                                                 monkeypatch, flag, content,
                                                                 message):
    def no_work(*args, **kwargs):
        raise AssertionError("the outputs must be checked before the start is built")

    monkeypatch.setattr(tool, "build_start", no_work)
    path = tmp_path / "missing" / "out.md" if content is None else tmp_path / "out"
    if content is not None:
        path.write_text(content)
    assert tool.main(["--out", str(tmp_path), "--models", "imdn", "--methods", "qat",
                      "--eval-sets", "Set5", "--data", str(data), flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert content is None or path.read_text() == content  # left as it was


def test_render_only_trains_nothing_and_writes_its_own_section(tool, data, tmp_path, monkeypatch):
    """Rows trained elsewhere (the H200 run in docs/methods/odm_h200_rows.json) rendered
    under a heading of their own; the comparison's section is left as it was."""
    from pathlib import Path

    def no_work(*args, **kwargs):
        raise AssertionError("--render-only must build and train nothing")

    monkeypatch.setattr(tool, "build_start", no_work)
    monkeypatch.setattr(tool, "train", no_work)
    rows = Path(__file__).parents[2] / "docs" / "methods" / "odm_h200_rows.json"
    before = rows.read_text()
    md = tmp_path / "odm.md"
    md.write_text(f"# ODM\n\n{tool.SECTION}\n\nkept\n")
    argv = ["--out", str(tmp_path / "runs"), "--render-only", "--json", str(rows),
            "--models", "imdn,pan", "--steps", "600", "--device", "cuda", "--eval-sets", "Set5",
            "--section", "## On a GPU", "--write", str(md), "--data", str(data)]
    assert tool.main(argv) == 0
    text = md.read_text()
    assert f"{tool.SECTION}\n\nkept" in text
    gpu = text.split("## On a GPU", 1)[1]
    assert "600 steps, batch 16, patch 48, lr 0.0001 (cosine), device cuda" in gpu
    assert "| imdn ×4 | W4A4 | `qat-w4a4-common` (0.0 min) | qat | 28.090 | 31.160 (-1.05) |" in gpu
    assert "| pan ×4 | W4A4 |" in gpu and gpu.count("| odm-v") == 2
    assert rows.read_text() == before  # read, not rewritten


def test_render_only_needs_rows(tool, data, tmp_path, capsys):
    assert tool.main(["--out", str(tmp_path), "--render-only", "--json",
                      str(tmp_path / "none.json"), "--data", str(data)]) == 2
    assert "--render-only renders the rows of --json" in capsys.readouterr().err


def test_a_cell_trained_by_another_command_is_named_when_replaced(tool, data, tmp_path,
                                                                  capsys):
    """The store keys a run by model, method and start; a run with another schedule (here
    more steps) replaces the cell, and the tool names it with the command it replaces."""
    row = {"model": "pan", "scale": 4, "bits": 4, "method": "qat", "objective": "+distil",
           "start_recipe": "s", "quant": {"Set5": 31.0}, "fp": {"Set5": 32.0}, "start": 30.0,
           "seconds": 1.0, "command": "python tools/odm_compare.py --steps 1200"}
    stored = tool.store_cells([row], None, "")
    assert tool.replaced_cells(stored, stored) == []  # the same run stored again
    longer = tool.store_cells([{**row, "command": "python tools/odm_compare.py --steps 1350"}],
                              None, "")
    assert tool.replaced_cells(stored, longer) == ["pan|x4|qat+distil@s|Set5|all"]
    assert tool.replaced_cells({}, longer) == []
    # through the command line: --render-only stores the rows of --json and names the cell
    store = tmp_path / "odm.json"
    store.write_text(tool.store_text(stored))
    (tmp_path / "rows.json").write_text(json.dumps([{**row, "command": "python x --steps 1350"}]))
    argv = ["--out", str(tmp_path), "--render-only", "--json", str(tmp_path / "rows.json"),
            "--store", str(store), "--eval-sets", "Set5", "--data", str(data)]
    assert tool.main(argv) == 0
    assert "cell pan|x4|qat+distil@s|Set5|all replaced; it was trained by `python " \
           "tools/odm_compare.py --steps 1200`" in capsys.readouterr().err
    assert json.loads(store.read_text())["pan|x4|qat+distil@s|Set5|all"]["command"] == \
        "python x --steps 1350"
    assert tool.main(argv) == 0 and "replaced" not in capsys.readouterr().err  # stored again
    unrecorded = {key: {k: v for k, v in cell.items() if k != "command"}
                  for key, cell in stored.items()}
    store.write_text(tool.store_text(unrecorded))
    assert tool.main(argv) == 0
    assert "Set5|all replaced; it was trained by a command the store did not record" in \
        capsys.readouterr().err
