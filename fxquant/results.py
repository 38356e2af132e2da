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


def render_markdown(results: dict) -> str:
    """One table per scale: rows model × recipe (FP first), columns datasets."""
    rows = list(results.values())
    lines = [
        "# Results",
        "",
        "PSNR (dB) / SSIM on the Y channel (BT.601), `scale` pixels shaved, LR from MATLAB",
        "bicubic; Δ is the PSNR change from the FP model (shown when both cover the same",
        "images). Calibration: each recipe's seeded LR training patches. `[first N]` marks rows",
        "on the first N images of a set. Produced by `make results` (`fxquant table --config",
        "docs/results/<name>.toml` for each config), which runs only cells missing from the",
        f"config's JSON store. Machine: {platform.machine()}, CPU only.",
        "",
    ]
    for scale in sorted({r["scale"] for r in rows}):
        at_scale = [r for r in rows if r["scale"] == scale]
        datasets = [d for d in ("Set5", "Set14", "B100", "Urban100")
                    if any(r["dataset"] == d for r in at_scale)]
        lines += [f"## ×{scale}", "",
                  "| Model | Recipe | " + " | ".join(datasets) + " |",
                  "|---|---|" + "---|" * len(datasets)]
        for model in sorted({r["model"] for r in at_scale}):
            recipes = sorted({r["recipe"] for r in at_scale if r["model"] == model},
                             key=lambda x: (x != FP, x))
            for recipe in recipes:
                cells = []
                for ds in datasets:
                    cell = _best(at_scale, model, recipe, ds)
                    fp = _best(at_scale, model, FP, ds)
                    if cell is None:
                        cells.append("—")
                        continue
                    text = f"{cell['psnr']:.2f} / {cell['ssim']:.4f}"
                    if recipe != FP and fp is not None and fp["limit"] == cell["limit"]:
                        text += f" ({cell['psnr'] - fp['psnr']:+.2f})"
                    if cell["limit"]:
                        text += f" [first {cell['limit']}]"
                    cells.append(text)
                lines.append(f"| {model} | {recipe} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _best(rows: list[dict], model: str, recipe: str, dataset: str) -> dict | None:
    """The full-set result if there is one, else the one on most images."""
    matches = [r for r in rows if (r["model"], r["recipe"], r["dataset"]) == (model, recipe, dataset)]
    return max(matches, key=lambda r: r["images"], default=None)
