"""The results matrix: models × scales × recipes × datasets, stored as JSON and rendered to
Markdown.

Each config ``docs/results/<name>.toml`` has its own store ``docs/results/<name>.json`` (so
methods add rows independently), and ``docs/results.md`` is rendered from every store in the
folder. FP scores found in any store are reused, so adding a recipe re-runs only that recipe.

A stored cell is reused only while its fingerprint (recipe content, weights file, code
version: see :mod:`fxquant.results_store`) matches; otherwise it is recomputed, with a line
saying why. Entries written before fingerprints existed carry none: they are *adopted* on
the next run, i.e. assumed to have been measured with the current recipes, weights and code,
and the current fingerprint is written into them. ``force`` recomputes every cell,
``force_recipes`` the cells of those recipes (e.g. to time their compiles again after a
change that moves no number).
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from fxquant.files import atomic_write_text, check_output_path
from fxquant.pipeline import spec_name
from fxquant.results_store import (  # noqa: F401  - re-exported
    CODE_VERSION, FP, RunSpec, cell_key, fingerprint, fingerprint_change, load_all_stores,
    load_store, read_config, store_text,
)

_key = cell_key  # the old name


@dataclass
class TablePlan:
    """What a run of a config does: cells kept, adopted (stored without a fingerprint),
    copied (FP rows from another store) and the groups to (re)compute with the reason."""

    results: dict
    kept: int = 0
    adopted: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    # (model, scale, recipe, limit) -> [(dataset, reason)], in config order
    to_run: dict[tuple, list[tuple[str, str]]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for (model, scale, recipe, limit), cells in self.to_run.items():
            subset = f", first {limit} images" if limit else ""
            for ds, reason in cells:
                out.append(f"run {model} x{scale} {recipe} {ds}{subset}: {reason}")
        out.append(f"{self.kept} cells up to date, {len(self.adopted)} adopted (stored without "
                   f"a fingerprint), {len(self.copied)} FP cells copied from other stores, "
                   f"{sum(len(c) for c in self.to_run.values())} to compute")
        return out


def plan_table(config: str | Path, *, data_root: str | None = None,
               force: bool = False, force_recipes: Collection[str] = ()) -> TablePlan:
    """Decide, without computing anything, which cells of ``config`` are reused, adopted or
    (re)computed. Raises on a bad config, store, recipe, model or dataset before any work
    starts."""
    from fxquant.data.benchmark import check_sets
    from fxquant.errors import FxquantError
    from fxquant.models import get_spec

    config = Path(config)
    runs = read_config(config)
    # checked first: a misspelt set or a scale without weights would fail only after the
    # compiles before it
    for index, run in enumerate(runs, 1):
        check_sets("benchmark", run.datasets, data_root)
        for model in run.models:
            weights = get_spec(model).weight_files  # the table scores the pretrained networks
            missing = [scale for scale in run.scales if scale not in weights]
            if missing:
                raise FxquantError(f"{config}: [[run]] {index}: no pretrained {model} for x"
                                   f"{', x'.join(map(str, missing))}; the zoo has {model} at x"
                                   f"{', x'.join(map(str, sorted(weights)))}")
    in_config = list(dict.fromkeys(r for run in runs for r in (FP,) + run.recipes))
    unknown = [r for r in force_recipes if r not in in_config]
    if unknown:
        raise FxquantError(f"{config}: --force-recipe {', '.join(unknown)}: no [[run]] has it; "
                           f"its recipes are {', '.join(in_config)}")
    plan = TablePlan(results=dict(load_store(config.with_suffix(".json"))))
    known = load_all_stores(config.parent)
    prints: dict[tuple, dict] = {}
    seen = set()
    for run in runs:
        for model in run.models:
            for scale in run.scales:
                for recipe in dict.fromkeys((FP,) + run.recipes):
                    for ds in run.datasets:
                        key = cell_key(model, scale, recipe, ds, run.limit)
                        if key in seen:
                            continue
                        seen.add(key)
                        if (model, scale, recipe) not in prints:
                            prints[model, scale, recipe] = fingerprint(model, scale, recipe,
                                                                       data_root)
                        forced = "--force" if force else \
                            "--force-recipe" if recipe in force_recipes else None
                        reason = _decide(plan, key, known, prints[model, scale, recipe], forced)
                        if reason:
                            plan.to_run.setdefault((model, scale, recipe, run.limit), []).append(
                                (ds, reason))
    return plan


def _decide(plan: TablePlan, key: str, known: dict, current: dict,
            forced: str | None) -> str | None:
    """Update ``plan`` for one cell; return why it must be computed (``forced``: the option
    that asks for it), or None."""
    results = plan.results
    entry = results.get(key)
    copied = False
    if entry is None and key.split("|")[2] == FP and key in known:
        entry, copied = known[key], True  # an FP row measured for another config
    if forced:
        return forced
    if entry is None:
        return "not measured yet"
    stored = entry.get("fingerprint")
    if stored is not None and stored != current:
        return f"stored result is stale: {fingerprint_change(stored, current)}"
    if stored is None:
        plan.adopted.append(key)
    elif copied:
        plan.copied.append(key)
    else:
        plan.kept += 1
    results[key] = {**entry, "fingerprint": current}
    return None


def pass_seconds(gm) -> list[list]:
    """``[[pass name, seconds], ...]`` of a compile, in pipeline order (where its time went)."""
    if gm is None or not hasattr(gm, "fxquant_pass_seconds"):
        return []
    return [[spec_name(spec), round(seconds, 1)]
            for (spec, _), seconds in zip(gm.fxquant_history, gm.fxquant_pass_seconds)]


def run_table(config: str | Path, out: str | Path, *, data_root: str | None = None,
              force: bool = False, dry_run: bool = False,
              force_recipes: Collection[str] = ()) -> dict:
    """Run every cell of ``config`` that is missing from its store or stale (every cell with
    ``force``, and those of ``force_recipes``), then re-render ``out`` from all stores beside
    the config. ``dry_run`` prints the plan and writes nothing."""
    from fxquant.workflow import evaluate_sets, prepare

    config = Path(config)
    store = config.with_suffix(".json")
    plan = plan_table(config, data_root=data_root, force=force, force_recipes=force_recipes)
    if dry_run:
        print("\n".join(plan.lines()))
        return plan.results
    check_output_path(store, "results store")  # before any work
    check_output_path(out, "results Markdown (--out)")
    results = plan.results
    if plan.adopted:
        print(f"adopted {len(plan.adopted)} stored results without a fingerprint (assumed "
              f"measured with the current recipes, weights and code); fingerprints written to "
              f"{store}", flush=True)
    atomic_write_text(store, store_text(results), "results store")
    for (model, scale, recipe, limit), cells in plan.to_run.items():
        for ds, reason in cells:
            print(f"{model} x{scale} {recipe} {ds}: computing ({reason})", flush=True)
        current = fingerprint(model, scale, recipe, data_root)
        started = time.perf_counter()
        models = prepare(model, scale, None if recipe == FP else recipe,
                         data_root=data_root, progress=True)
        compile_s = time.perf_counter() - started
        which = "fp" if recipe == FP else "quant"
        passes = pass_seconds(models.quant_model)
        scores = evaluate_sets(models.runner(which), models.spec, scale, [ds for ds, _ in cells],
                               data_root=data_root, limit=limit, progress=True,
                               label=f"{model} x{scale} {recipe}")
        for ds, score in scores.items():
            results[cell_key(model, scale, recipe, ds, limit)] = {
                "model": model, "scale": scale, "recipe": recipe, "dataset": ds,
                "limit": limit, "psnr": score.psnr, "ssim": score.ssim,
                "images": len(score.images), "compile_s": round(compile_s, 2),
                **({"pass_s": passes} if passes else {}), "fingerprint": current}
        atomic_write_text(store, store_text(results), "results store")
        print(f"{model} x{scale} {recipe}: " + ", ".join(
            f"{ds} {s.psnr:.3f}/{s.ssim:.4f}" for ds, s in scores.items()), flush=True)
    atomic_write_text(out, render_markdown(load_all_stores(config.parent)), "results Markdown")
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
                    text = f"{cell['psnr']:.2f}" + (  # SSIM absent: PSNR alone
                        f" / {cell['ssim']:.4f}" if cell["ssim"] is not None else "")
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
