"""The results matrix: models × scales × recipes × datasets, stored as JSON and rendered to
Markdown.

Each config ``docs/results/<name>.toml`` has its own store ``docs/results/<name>.json`` (so
methods add rows independently), and ``docs/results.md`` is rendered from every store in the
folder. FP scores found in any store are reused, so adding a recipe re-runs only that recipe.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fxquant.errors import RecipeError
from fxquant.recipe import tomllib

FP = "fp"


@dataclass(frozen=True)
class RunSpec:
    models: tuple[str, ...]
    scales: tuple[int, ...]
    recipes: tuple[str, ...]
    datasets: tuple[str, ...]
    limit: int | None = None


def read_config(path: str | os.PathLike) -> list[RunSpec]:
    data = tomllib.loads(Path(path).read_text())
    runs = data.get("run")
    if not isinstance(runs, list) or not runs:
        raise RecipeError(f"{path}: expected one or more [[run]] tables")
    specs = []
    valid = {"models", "scales", "recipes", "datasets", "limit"}
    for index, run in enumerate(runs):
        unknown = set(run) - valid
        if unknown:
            raise RecipeError(f"{path}: run {index}: unknown keys {sorted(unknown)}; valid: "
                              f"{sorted(valid)}")
        specs.append(RunSpec(tuple(run["models"]), tuple(run["scales"]), tuple(run["recipes"]),
                             tuple(run["datasets"]), run.get("limit") or None))
    return specs


def _key(model: str, scale: int, recipe: str, dataset: str, limit: int | None) -> str:
    return f"{model}|x{scale}|{recipe}|{dataset}|{limit or 'all'}"


def load_store(path: str | os.PathLike) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def load_all_stores(folder: str | os.PathLike) -> dict:
    merged: dict = {}
    for path in sorted(Path(folder).glob("*.json")):
        merged.update(load_store(path))
    return merged


def run_table(config: str | os.PathLike, out: str | os.PathLike, *,
              data_root: str | None = None) -> dict:
    """Run every cell of ``config`` missing from its store, then re-render ``out`` from all
    stores beside the config."""
    from fxquant.workflow import evaluate_sets, prepare

    config = Path(config)
    store = config.with_suffix(".json")
    results = load_store(store)
    known = load_all_stores(config.parent)
    for run in read_config(config):
        for model in run.models:
            for scale in run.scales:
                for recipe in (FP,) + run.recipes:
                    for ds in run.datasets:  # FP rows computed for another config
                        key = _key(model, scale, recipe, ds, run.limit)
                        if recipe == FP and key in known and key not in results:
                            results[key] = known[key]
                    missing = [ds for ds in run.datasets
                               if _key(model, scale, recipe, ds, run.limit) not in results]
                    if not missing:
                        continue
                    started = time.perf_counter()
                    models = prepare(model, scale, None if recipe == FP else recipe,
                                     data_root=data_root, progress=True)
                    compile_s = time.perf_counter() - started
                    which = "fp" if recipe == FP else "quant"
                    scores = evaluate_sets(models.runner(which), models.spec, scale, missing,
                                           data_root=data_root, limit=run.limit, progress=True,
                                           label=f"{model} x{scale} {recipe}")
                    for ds, score in scores.items():
                        results[_key(model, scale, recipe, ds, run.limit)] = {
                            "model": model, "scale": scale, "recipe": recipe, "dataset": ds,
                            "limit": run.limit, "psnr": score.psnr, "ssim": score.ssim,
                            "images": len(score.images), "compile_s": round(compile_s, 2)}
                    Path(store).write_text(json.dumps(results, indent=1, sort_keys=True))
                    print(f"{model} x{scale} {recipe}: " + ", ".join(
                        f"{ds} {s.psnr:.3f}/{s.ssim:.4f}" for ds, s in scores.items()), flush=True)
    Path(store).write_text(json.dumps(results, indent=1, sort_keys=True))
    Path(out).write_text(render_markdown(load_all_stores(config.parent)))
    return results


DATASET_ORDER = ("Set5", "Set14", "B100", "Urban100")
# Row order inside a model: the float model, the uniform baselines, then each method.
FAMILY_ORDER = ("fp", "minmax", "mse", "percentile", "daq", "dfsq", "i2nq", "recon")
# The at-a-glance table: these recipes as columns, where measured.
HEADLINE = ("fp", "minmax-w4a4", "mse-w4a4", "daq-w4a4", "daq-mp4", "dfsq-w4a4", "i2nq-w4a4",
            "minmax-w3a3", "mse-w3a3", "daq-w3a3", "daq-mp3", "dfsq-w3a3", "i2nq-w3a3")


def recipe_sort_key(recipe: str) -> tuple:
    """``fp`` first, then families in FAMILY_ORDER (others after, alphabetically), and within
    a family the higher bit-width first (``mse-w8a8`` before ``mse-w4a4``), a mixed-precision
    budget (``daq-mp3``) after the uniform recipe of the same bits."""
    family = recipe.split("-")[0]
    rank = FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)
    found = re.search(r"-w(\d+)a\d+|-mp(\d+)", recipe)
    bits = int(found.group(1) or found.group(2)) if found else 0
    mixed = bool(found and found.group(2))
    return (rank, family, -bits, mixed, recipe)


def _column_label(dataset: str, limit: int | None) -> str:
    return f"{dataset} (first {limit})" if limit else dataset


def _columns(rows: list[dict]) -> list[tuple[str, int | None]]:
    """(dataset, limit) pairs present, datasets in DATASET_ORDER, subsets before full sets."""
    pairs = {(r["dataset"], r["limit"] or None) for r in rows}
    order = {d: i for i, d in enumerate(DATASET_ORDER)}
    return sorted(pairs, key=lambda p: (order.get(p[0], len(order)), p[0], p[1] is None,
                                        p[1] or 0))


def _find(rows: list[dict], model: str, recipe: str, dataset: str,
          limit: int | None) -> dict | None:
    for r in rows:
        if (r["model"], r["recipe"], r["dataset"], r["limit"] or None) == (model, recipe,
                                                                            dataset, limit):
            return r
    return None


def render_markdown(results: dict) -> str:
    """Per scale: an at-a-glance PSNR table of the HEADLINE recipes, then the full table (rows
    model × recipe, FP first; one column per dataset and image subset). Δ is always taken
    against the FP result on exactly the same images."""
    rows = list(results.values())
    lines = [
        "# Results",
        "",
        "PSNR (dB) / SSIM on the Y channel (BT.601), `scale` pixels shaved, LR from MATLAB",
        "bicubic; (Δ) is the PSNR change from the FP model on the same images. Columns marked",
        "`(first N)` cover the first N images of the set (sorted by file name). Calibration:",
        "each recipe's seeded LR training patches. Produced by `make results` (`fxquant table",
        "--config docs/results/<name>.toml` for each config), which runs only cells missing",
        f"from the config's JSON store. Machine: {platform.machine()}, CPU only.",
        "",
    ]
    for scale in sorted({r["scale"] for r in rows}):
        at_scale = [r for r in rows if r["scale"] == scale]
        columns = _columns(at_scale)
        models = sorted({r["model"] for r in at_scale})
        lines += [f"## ×{scale}", ""]
        lines += _headline(at_scale, models, columns)
        lines += ["| Model | Recipe | " + " | ".join(_column_label(*c) for c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for model in models:
            recipes = sorted({r["recipe"] for r in at_scale if r["model"] == model},
                             key=recipe_sort_key)
            for recipe in recipes:
                cells = []
                for dataset, limit in columns:
                    cell = _find(at_scale, model, recipe, dataset, limit)
                    fp = _find(at_scale, model, FP, dataset, limit)
                    if cell is None:
                        cells.append("—")
                        continue
                    text = f"{cell['psnr']:.2f} / {cell['ssim']:.4f}"
                    if recipe != FP and fp is not None:
                        text += f" ({cell['psnr'] - fp['psnr']:+.2f})"
                    cells.append(text)
                lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _headline(rows: list[dict], models: list[str],
              columns: list[tuple[str, int | None]]) -> list[str]:
    """PSNR only, one row per (model, dataset column), the HEADLINE recipes as columns; the
    best quantized PSNR of each row in bold."""
    recipes = [r for r in HEADLINE if any(row["recipe"] == r for row in rows)]
    if len(recipes) < 2:
        return []
    out = ["At a glance (PSNR dB; best quantized result of each row in bold):", "",
           "| Model | Images | " + " | ".join(recipes) + " |",
           "|---|---|" + "---:|" * len(recipes)]
    for model in models:
        for dataset, limit in columns:
            found = {r: _find(rows, model, r, dataset, limit) for r in recipes}
            quantized = [f["psnr"] for r, f in found.items() if f and r != FP]
            if not quantized:
                continue
            best = max(quantized)
            cells = []
            for recipe, f in found.items():
                if f is None:
                    cells.append("—")
                elif recipe != FP and f["psnr"] == best:
                    cells.append(f"**{f['psnr']:.2f}**")
                else:
                    cells.append(f"{f['psnr']:.2f}")
            out.append(f"| {model} | {_column_label(dataset, limit)} | " + " | ".join(cells)
                       + " |")
    return out + [""]
