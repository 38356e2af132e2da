"""tools/calibration_cost.py: the table it builds from stored results, and its errors."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("calibration_cost")


def entry(model, scale, recipe, dataset, seconds):
    return {"model": model, "scale": scale, "recipe": recipe, "dataset": dataset,
            "limit": None, "psnr": 30.0, "ssim": 0.9, "compile_s": seconds}


def test_one_row_per_preset_and_the_budget_marked(tool, tmp_path):
    store = {f"{m}|x{s}|{r}|{d}|all": entry(m, s, r, d, t) for m, s, r, d, t in [
        ("imdn", 4, "fp", "Set5", 0.1), ("imdn", 4, "recon-w4a4", "Set5", 546.0),
        ("imdn", 4, "recon-w4a4", "Urban100", 546.0), ("carn_m", 4, "recon-w4a4", "Set5", 1054.0),
        ("imdn", 2, "mse-w4a4", "Set5", 30.0), ("imdn", 4, "mse-w4a4", "Set5", 49.0)]}
    (tmp_path / "a.json").write_text(json.dumps(store))
    out = tmp_path / "perf.md"
    out.write_text("# Performance\n\n## Other\n\nkept\n")
    assert tool.main(["--results", str(tmp_path), "--write", str(out)]) == 0
    text = out.read_text()
    assert "## Other\n\nkept" in text
    assert "| preset | carn_m | imdn |" in text
    assert "| `recon-w4a4` | **1054** | 546 |" in text  # over 900 s in bold
    assert "| `mse-w4a4` | — | 49 |" in text and "| `fp`" not in text


def test_the_passes_wall_times_split_each_compile(tool, tmp_path, capsys):
    timed = {**entry("carn_m", 4, "recon-w4a4", "Set5", 900.0),
             "pass_s": [["trace", 0.3], ["calibrate", 58.0], ["fswa", 23.0],
                        ["reconstruct", 780.0], ["verify", 0.1]]}
    store = {"carn_m|x4|recon-w4a4|Set5|all": timed,
             "imdn|x4|recon-w4a4|Set5|all": entry("imdn", 4, "recon-w4a4", "Set5", 500.0)}
    (tmp_path / "a.json").write_text(json.dumps(store))
    assert tool.main(["--results", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    # passes under 2 % of the 900 s summed as other; 38.6 s spent outside the passes
    assert ("| `recon-w4a4` | carn_m | 900 | calibrate 58, fswa 23, reconstruct 780, other 0.4 | 39 |"
            in text)
    assert "| imdn |" not in text.split("Where the time went")[1]  # no pass times stored


def test_a_model_compiled_twice_shows_both_compiles(tool, tmp_path, capsys):
    """Set5 and Urban100 computed in separate runs: two compiles, shown as a span whichever
    order they are stored in (before, the last one read was shown alone)."""
    for order in ((434.0, 478.0), (478.0, 434.0), (434.0, 912.0)):
        store = {f"pan|x4|dfsq-w4a4-recon|{d}|all": entry("pan", 4, "dfsq-w4a4-recon", d, t)
                 for d, t in zip(("Set5", "Urban100"), order)}
        (tmp_path / "a.json").write_text(json.dumps(store))
        assert tool.main(["--results", str(tmp_path)]) == 0
        low, high = sorted(order)
        text = f"{low:.0f}–{high:.0f}"
        assert f"| `dfsq-w4a4-recon` | {f'**{text}**' if high > 900 else text} |" in \
            capsys.readouterr().out


def test_nothing_stored_is_an_error(tool, tmp_path, capsys):
    assert tool.main(["--results", str(tmp_path), "--scale", "3"]) == 2
    assert "no stored result at x3" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["nan", "inf", "-5", "0", "ten"])
def test_a_budget_that_is_not_a_positive_number_is_refused(tool, tmp_path, capsys, budget):
    with pytest.raises(SystemExit) as stop:  # nan would mark nothing and print "nan-minute"
        tool.main(["--results", str(tmp_path), "--budget", budget])
    assert stop.value.code == 2
    assert "argument --budget:" in capsys.readouterr().err
