"""The results matrix: config validation, which cells run, and the rendered Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fxquant import RecipeError
from fxquant import results as results_mod
from fxquant.cli import main
from fxquant.errors import FxquantError, StoreError
from fxquant.evaluate import ImageScore, SetScore
from fxquant.results import read_config, recipe_sort_key, render_markdown, run_table


def _row(model, recipe, dataset, psnr, limit=None, scale=4, images=5):
    return {"model": model, "scale": scale, "recipe": recipe, "dataset": dataset,
            "limit": limit, "psnr": psnr, "ssim": 0.5, "images": images, "compile_s": 0.0}


def _store(*rows) -> dict:
    return {results_mod._key(r["model"], r["scale"], r["recipe"], r["dataset"], r["limit"]): r
            for r in rows}


def test_config_with_an_unknown_key_names_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[run]]\nmodels = ["imdn"]\nscales = [4]\nrecipes = ["fp"]\n'
                    'datasets = ["Set5"]\nlimits = 3\n')
    with pytest.raises(RecipeError, match=r"unknown keys \['limits'\].*'limit'"):
        read_config(path)
    path.write_text("title = 'no runs'\n")
    with pytest.raises(RecipeError, match=r"\[\[run\]\]"):
        read_config(path)


def test_recipes_are_ordered_fp_baselines_methods_and_high_bits_first():
    recipes = ["dfsq-w4a4", "daq-w3a3", "mse-w4a4", "fp", "daq-mp3", "minmax-w4a4",
               "minmax-w8a8", "daq-w4a4", "custom"]
    assert sorted(recipes, key=recipe_sort_key) == [
        "fp", "minmax-w8a8", "minmax-w4a4", "mse-w4a4", "daq-w4a4", "daq-w3a3", "daq-mp3",
        "dfsq-w4a4", "custom"]


def test_delta_is_only_against_fp_on_the_same_images():
    text = render_markdown(_store(
        _row("imdn", "fp", "Set5", 32.0),
        _row("imdn", "fp", "Urban100", 26.0, images=100),
        _row("imdn", "fp", "Urban100", 25.5, limit=20, images=20),
        _row("imdn", "daq-w4a4", "Set5", 29.0),
        _row("imdn", "daq-w4a4", "Urban100", 23.5, limit=20, images=20),
        _row("imdn", "mse-w4a4", "Urban100", 24.0, images=100),
    ))
    table = text[text.index("| Model | Recipe |"):].splitlines()
    assert table[0] == "| Model | Recipe | Set5 | Urban100 (first 20) | Urban100 |"
    rows = {line.split(" | ")[1]: line for line in table[2:] if line.startswith("| imdn")}
    assert list(rows) == ["fp", "mse-w4a4", "daq-w4a4"]
    assert "29.00 / 0.5000 (-3.00)" in rows["daq-w4a4"]
    assert "23.50 / 0.5000 (-2.00)" in rows["daq-w4a4"]  # against 25.5, not 26.0
    assert rows["daq-w4a4"].endswith("| — |")
    assert "24.00 / 0.5000 (-2.00)" in rows["mse-w4a4"]


def test_a_cell_without_ssim_shows_psnr_alone():
    """Stores written by other commands (tools/odm_compare.py --store) may lack SSIM."""
    trained = {**_row("imdn", "qat@recon-w4a4", "Set5", 31.3), "ssim": None}
    text = render_markdown(_store(_row("imdn", "fp", "Set5", 32.2), trained))
    assert "| imdn | qat@recon-w4a4 | 31.30 (-0.90) |" in text


def test_headline_marks_the_best_quantized_result_of_each_row():
    text = render_markdown(_store(
        _row("pan", "fp", "Set5", 32.1), _row("pan", "mse-w4a4", "Set5", 29.2),
        _row("pan", "daq-w4a4", "Set5", 29.4), _row("pan", "dfsq-w4a4", "Set5", 30.9),
    ))
    assert "| Model | Images | fp | mse-w4a4 | daq-w4a4 | dfsq-w4a4 |" in text
    assert "| pan | Set5 | 32.10 | 29.20 | 29.40 | **30.90** |" in text


class FakeCompiled:  # what a compile records: each pass and its wall time
    fxquant_history = [("trace", {"nodes": 3}), ("reconstruct{steps=5}", {"steps": 5})]
    fxquant_pass_seconds = [0.04, 12.34]


class FakeModels:
    spec = None
    quant_model = FakeCompiled()

    def runner(self, which):
        return which


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    """No real compile or evaluation; a data root whose weights are a few bytes. Returns the
    list of (recipe, datasets) evaluated and the data root."""
    root = tmp_path / "data"
    (root / "weights").mkdir(parents=True)
    (root / "weights" / "IMDN_x4.pth").write_bytes(b"weights v1")
    for name in ("Set5", "Set14"):  # the sets the configs name must exist
        (root / "benchmark" / name / "HR").mkdir(parents=True)
    calls = []

    def fake_prepare(model, scale, recipe, **kwargs):
        calls.append(recipe)
        return FakeModels()

    def fake_evaluate(runner, spec, scale, datasets, **kwargs):
        calls[-1] = (calls[-1], tuple(datasets))
        return {ds: SetScore(ds, 28.7, 0.8, [ImageScore("a", 28.7, 0.8)]) for ds in datasets}

    monkeypatch.setattr("fxquant.workflow.prepare", fake_prepare)
    monkeypatch.setattr("fxquant.workflow.evaluate_sets", fake_evaluate)
    return calls, root


def _config(folder: Path, recipes: list[str], datasets=("Set5",)) -> Path:
    config = folder / "method.toml"
    config.write_text(f"[[run]]\nmodels = [\"imdn\"]\nscales = [4]\n"
                      f"recipes = {json.dumps(recipes)}\ndatasets = {json.dumps(list(datasets))}\n")
    return config


def test_run_table_runs_only_missing_cells_and_reuses_fp_from_other_stores(tmp_path, fake_run):
    calls, root = fake_run
    config = _config(tmp_path, ["daq-w4a4", "daq-w3a3"])
    (tmp_path / "uniform.json").write_text(json.dumps(_store(_row("imdn", "fp", "Set5", 32.2))))
    (tmp_path / "method.json").write_text(json.dumps(_store(_row("imdn", "daq-w4a4", "Set5",
                                                                 29.1))))
    out = tmp_path / "results.md"
    stored = run_table(config, out, data_root=root)
    assert calls == [("daq-w3a3", ("Set5",))]  # FP came from uniform.json, daq-w4a4 was stored
    assert stored["imdn|x4|daq-w3a3|Set5|all"]["psnr"] == 28.7
    assert stored["imdn|x4|daq-w3a3|Set5|all"]["pass_s"] == [["trace", 0.0], ["reconstruct", 12.3]]
    assert stored["imdn|x4|fp|Set5|all"]["psnr"] == 32.2
    assert "| imdn | daq-w3a3 | 28.70 / 0.8000 (-3.50) |" in out.read_text()
    run_table(config, out, data_root=root)  # everything present: nothing runs
    assert len(calls) == 1


def test_an_old_entry_without_fingerprint_is_adopted_once_and_renders_the_same(
        tmp_path, fake_run, capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"])
    old = _store(_row("imdn", "fp", "Set5", 32.2), _row("imdn", "mse-w4a4", "Set5", 30.1))
    (tmp_path / "method.json").write_text(json.dumps(old))
    before = render_markdown(old)
    run_table(config, tmp_path / "results.md", data_root=root, dry_run=True)
    assert "0 cells up to date, 2 adopted" in capsys.readouterr().out
    assert json.loads((tmp_path / "method.json").read_text()) == old  # a dry run writes nothing
    assert not (tmp_path / "results.md").exists()
    run_table(config, tmp_path / "results.md", data_root=root)
    assert calls == []
    assert "adopted 2 stored results without a fingerprint" in capsys.readouterr().out
    stored = json.loads((tmp_path / "method.json").read_text())
    assert {k: {f: v for f, v in e.items() if f != "fingerprint"} for k, e in stored.items()} \
        == old
    mse = stored["imdn|x4|mse-w4a4|Set5|all"]["fingerprint"]
    assert mse["code"] == results_mod.CODE_VERSION and mse["recipe"] != "fp"
    assert stored["imdn|x4|fp|Set5|all"]["fingerprint"]["recipe"] == "fp"
    assert (tmp_path / "results.md").read_text() == before
    run_table(config, tmp_path / "results.md", data_root=root, dry_run=True)
    assert "2 cells up to date, 0 adopted" in capsys.readouterr().out


def test_editing_a_recipe_file_invalidates_its_cells(tmp_path, fake_run, capsys):
    calls, root = fake_run
    recipe = tmp_path / "mine.toml"
    recipe.write_text('method = "uniform"\n[weights]\nbits = 4\n[activations]\nbits = 4\n')
    config = _config(tmp_path, [str(recipe)])
    out = tmp_path / "results.md"
    run_table(config, out, data_root=root)
    assert calls == [(None, ("Set5",)), (str(recipe), ("Set5",))]
    run_table(config, out, data_root=root)
    assert len(calls) == 2  # unchanged: nothing runs
    recipe.write_text('method = "uniform"\n[weights]\nbits = 3\n[activations]\nbits = 3\n')
    capsys.readouterr()
    run_table(config, out, data_root=root, dry_run=True)
    assert f"run imdn x4 {recipe} Set5: stored result is stale: the recipe changed" in \
        capsys.readouterr().out
    run_table(config, out, data_root=root)
    assert calls[2:] == [(str(recipe), ("Set5",))]  # only the edited recipe, not FP
    assert "computing (stored result is stale: the recipe changed)" in capsys.readouterr().out


def test_new_weights_or_code_version_recompute_and_force_recomputes_all(tmp_path, fake_run,
                                                                        monkeypatch):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"], datasets=("Set5", "Set14"))
    out = tmp_path / "results.md"
    run_table(config, out, data_root=root)
    assert calls == [(None, ("Set5", "Set14")), ("mse-w4a4", ("Set5", "Set14"))]
    (root / "weights" / "IMDN_x4.pth").write_bytes(b"weights v2, retrained")
    run_table(config, out, data_root=root)
    assert len(calls) == 4  # both rows again: the weights changed
    monkeypatch.setattr("fxquant.results_store.CODE_VERSION", 99)  # numerics changed
    run_table(config, out, data_root=root)
    assert len(calls) == 6
    run_table(config, out, data_root=root)
    assert len(calls) == 6
    run_table(config, out, data_root=root, force=True)
    assert len(calls) == 8


def test_cli_table_dry_run_and_force_flags(tmp_path, fake_run, capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"])
    out = tmp_path / "results.md"
    argv = ["table", "--config", str(config), "--out", str(out), "--data", str(root)]
    assert main(argv + ["--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "run imdn x4 fp Set5: not measured yet" in text and "2 to compute" in text
    assert calls == [] and not out.exists() and not config.with_suffix(".json").exists()
    assert main(argv) == 0 and len(calls) == 2
    assert main(argv + ["--force"]) == 0 and len(calls) == 4


def test_force_recipe_recomputes_that_recipe_alone(tmp_path, fake_run, capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4", "minmax-w4a4"])
    out = tmp_path / "results.md"
    argv = ["table", "--config", str(config), "--out", str(out), "--data", str(root)]
    assert main(argv) == 0 and len(calls) == 3  # FP and both recipes
    assert main(argv + ["--force-recipe", "mse-w4a4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "run imdn x4 mse-w4a4 Set5: --force-recipe" in text and "1 to compute" in text
    assert main(argv + ["--force-recipe", "mse-w4a4"]) == 0
    assert calls[3:] == [("mse-w4a4", ("Set5",))]
    with pytest.raises(FxquantError, match="--force-recipe recon-w4a4: no \\[\\[run\\]\\] has it; "
                       "its recipes are fp, mse-w4a4, minmax-w4a4"):
        run_table(config, out, data_root=root, force_recipes=["recon-w4a4"])


BAD_CONFIGS = [
    (None, "results config .*does not exist"),
    (b"\xff\xfe\x00binary", "is not UTF-8 text"),
    ("[[run]\nmodels = 1", "is not valid TOML"),
    ('[[run]]\nmodels = ["imdn"]\nscales = [4]\nrecipes = ["fp"]\n',
     r"\[\[run\]\] 1: missing key 'datasets'; every run needs models, scales, recipes, datasets"),
    ('[[run]]\nmodels = "imdn"\nscales = [4]\nrecipes = ["fp"]\ndatasets = ["Set5"]\n',
     r"'models' must be a list of strs, e\.g\. models = \[\"imdn\", \"pan\"\]; got 'imdn'"),
    ('[[run]]\nmodels = ["imdn"]\nscales = ["4"]\nrecipes = ["fp"]\ndatasets = ["Set5"]\n',
     "'scales' must hold positive integers"),
    ('[[run]]\nmodels = ["imdn"]\nscales = [4]\nrecipes = [1]\ndatasets = ["Set5"]\n',
     "'recipes' must hold non-empty strings"),
    ('[[run]]\nmodels = ["imdn"]\nscales = [4]\nrecipes = ["fp"]\ndatasets = []\n',
     "'datasets' is empty"),
    ('[[run]]\nmodels = ["imdn"]\nscales = [4]\nrecipes = ["fp"]\ndatasets = ["Set5"]\n'
     'limit = "20"\n', "'limit' must be a positive integer"),
    ("run = [1, 2]\n", r"\[\[run\]\] 1: expected a table"),
]


@pytest.mark.parametrize("content, message", BAD_CONFIGS)
def test_bad_configs_name_the_file_and_key(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(RecipeError, match=message):
        read_config(path)
    assert main(["table", "--config", str(path), "--out", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxquant table: error: ") and "bad.toml" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2, 3]", "is not a results store: expected a JSON object .* got a list"),
    ('{"imdn|x4|fp|Set5|all": 32.1}', "entry 'imdn|x4|fp|Set5|all' is not a result"),
    ('{"a": {"model": "imdn"}}', "entry 'a' is not a result"),
    (b"\x80\x81binary", "is not UTF-8 text"),
    (json.dumps({"a": {**_row("imdn", "fp", "Set5", 32.2), "pass_s": [["trace", -1]]}}),
     r"entry 'a' has 'pass_s' \[\['trace', -1\]\]; expected a list of \[pass name, seconds\]"),
    (json.dumps({"a": {**_row("imdn", "fp", "Set5", 32.2), "pass_s": {"trace": 0.1}}}),
     "entry 'a' has 'pass_s'"),
])
def test_corrupt_or_foreign_stores_are_clear_errors(tmp_path, fake_run, content, message):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"])
    store = config.with_suffix(".json")
    if isinstance(content, bytes):
        store.write_bytes(content)
    else:
        store.write_text(content)
    with pytest.raises(StoreError, match=message):
        run_table(config, tmp_path / "results.md", data_root=root)
    assert calls == []
    assert store.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_a_misspelt_dataset_is_named_before_computing(tmp_path, fake_run, capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"], datasets=("Set5", "Set6"))
    assert main(["table", "--config", str(config), "--out", str(tmp_path / "r.md"),
                 "--data", str(root)]) == 2
    assert "benchmark set 'Set6' not found" in capsys.readouterr().err and calls == []


def test_a_scale_without_pretrained_weights_is_named_before_computing(tmp_path, fake_run,
                                                                       capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"])
    config.write_text(config.read_text().replace("scales = [4]", "scales = [4, 5]"))
    assert main(["table", "--config", str(config), "--out", str(tmp_path / "r.md"),
                 "--data", str(root)]) == 2
    assert ("[[run]] 1: no pretrained imdn for x5; the zoo has imdn at x2, x3, x4"
            in capsys.readouterr().err) and calls == []


def test_table_checks_its_outputs_before_computing(tmp_path, fake_run, capsys):
    calls, root = fake_run
    config = _config(tmp_path, ["mse-w4a4"])
    assert main(["table", "--config", str(config), "--out", str(tmp_path / "no" / "r.md"),
                 "--data", str(root)]) == 2
    assert "folder " in capsys.readouterr().err and calls == []


def test_docs_results_md_is_rendered_from_the_committed_stores():
    root = Path(__file__).resolve().parents[1] / "docs"
    expected = render_markdown(results_mod.load_all_stores(root / "results"))
    assert (root / "results.md").read_text() == expected, (
        "docs/results.md is stale: re-render it (fxquant table --config any "
        "docs/results/*.toml re-renders it after running the missing cells)")
