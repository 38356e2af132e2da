"""The results matrix: config validation, which cells run, and the rendered Markdown."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fxquant import RecipeError
from fxquant import results as results_mod
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


def test_headline_marks_the_best_quantized_result_of_each_row():
    text = render_markdown(_store(
        _row("pan", "fp", "Set5", 32.1), _row("pan", "mse-w4a4", "Set5", 29.2),
        _row("pan", "daq-w4a4", "Set5", 29.4), _row("pan", "dfsq-w4a4", "Set5", 30.9),
    ))
    assert "| Model | Images | fp | mse-w4a4 | daq-w4a4 | dfsq-w4a4 |" in text
    assert "| pan | Set5 | 32.10 | 29.20 | 29.40 | **30.90** |" in text


def test_run_table_runs_only_missing_cells_and_reuses_fp_from_other_stores(tmp_path,
                                                                           monkeypatch):
    config = tmp_path / "method.toml"
    config.write_text(textwrap.dedent("""
        [[run]]
        models = ["imdn"]
        scales = [4]
        recipes = ["daq-w4a4", "daq-w3a3"]
        datasets = ["Set5"]
    """))
    (tmp_path / "uniform.json").write_text(json.dumps(_store(_row("imdn", "fp", "Set5", 32.2))))
    (tmp_path / "method.json").write_text(json.dumps(_store(_row("imdn", "daq-w4a4", "Set5",
                                                                 29.1))))
    prepared = []

    class FakeModels:
        spec = None

        def runner(self, which):
            return which

    def fake_prepare(model, scale, recipe, **kwargs):
        prepared.append(recipe)
        return FakeModels()

    def fake_evaluate(runner, spec, scale, datasets, **kwargs):
        return {ds: SetScore(ds, 28.7, 0.8, [ImageScore("a", 28.7, 0.8)]) for ds in datasets}

    monkeypatch.setattr("fxquant.workflow.prepare", fake_prepare)
    monkeypatch.setattr("fxquant.workflow.evaluate_sets", fake_evaluate)
    out = tmp_path / "results.md"
    stored = run_table(config, out)
    assert prepared == ["daq-w3a3"]  # FP came from uniform.json, daq-w4a4 was stored
    assert stored["imdn|x4|daq-w3a3|Set5|all"]["psnr"] == 28.7
    assert stored["imdn|x4|fp|Set5|all"]["psnr"] == 32.2
    assert "| imdn | daq-w3a3 | 28.70 / 0.8000 (-3.50) |" in out.read_text()
    run_table(config, out)  # everything present: nothing runs
    assert prepared == ["daq-w3a3"]


def test_docs_results_md_is_rendered_from_the_committed_stores():
    root = Path(__file__).resolve().parents[1] / "docs"
    expected = render_markdown(results_mod.load_all_stores(root / "results"))
    assert (root / "results.md").read_text() == expected, (
        "docs/results.md is stale: re-render it (fxquant table --config any "
        "docs/results/*.toml re-renders it after running the missing cells)")
