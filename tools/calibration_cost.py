"""Calibration cost of each preset: the ``compile_s`` that ``fxquant table`` stored with every
result (the whole of ``fxquant.compile``: calibration, range search, FSWA, reconstruction).

    python tools/calibration_cost.py [--results docs/results] [--scale 4]
        [--recipes recon-w4a4,i2nq-w4a4-recon] [--write docs/performance.md]

One row per preset, one column per model; times over ``--budget`` seconds (15 minutes, the
reconstruction issue's budget) are marked. The stores do not record what else ran on the
machine; the table says so.
"""

from __future__ import annotations

import argparse
import sys

from fxquant.cli_args import positive_float
from fxquant.errors import FxquantError
from fxquant.markdown import write_section
from fxquant.results import recipe_sort_key
from fxquant.results_store import FP, load_all_stores

SECTION = "## Calibration cost"


def stored_compiles(entries: dict, scale: int, recipes: list[str] | None) -> dict:
    """``{(recipe, model): [cell, ...]}``: the stored cells of each model × recipe at
    ``scale``. The cells of one compile share its ``compile_s``; a model × recipe whose
    datasets were computed in separate runs, or by several configs, has several compiles."""
    compiles: dict[tuple[str, str], list[dict]] = {}
    for entry in entries.values():
        if entry["recipe"] == FP or entry["scale"] != scale or "compile_s" not in entry:
            continue
        if recipes and entry["recipe"] not in recipes:
            continue
        compiles.setdefault((entry["recipe"], entry["model"]), []).append(entry)
    return compiles


def cost_table(compiles: dict) -> dict:
    """``{recipe: {model: (fastest, slowest)}}`` compile seconds from :func:`stored_compiles`
    (the same where a model × recipe was compiled once)."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for (recipe, model), cells in compiles.items():
        seconds = [cell["compile_s"] for cell in cells]
        table.setdefault(recipe, {})[model] = (min(seconds), max(seconds))
    return table


def pass_split(compiles: dict) -> dict:
    """``{(recipe, model): (compile_s, [[pass, seconds], ...])}`` for the compiles that
    recorded their passes' wall times (``pass_s``, stored since the passes were timed); of
    several, the slowest."""
    split = {}
    for key, cells in compiles.items():
        timed = [cell for cell in cells if cell.get("pass_s")]
        if timed:
            cell = max(timed, key=lambda c: c["compile_s"])
            split[key] = (cell["compile_s"], cell["pass_s"])
    return split


def render_split(split: dict, share: float = 0.02) -> str:
    """One line per (preset, model): the passes that took at least ``share`` of the compile,
    the rest summed, and what the compile spent outside the passes (model build, reading the
    calibration patches)."""
    lines = ["", "Where the time went, per pass (wall seconds, the `pass_s` stored with each "
             f"cell; passes under {share:.0%} of the compile summed as *other*):", "",
             "| preset | model | compile | passes | outside the passes |",
             "|---|---|---:|---|---:|"]
    for (recipe, model), (compile_s, passes) in sorted(
            split.items(), key=lambda kv: (recipe_sort_key(kv[0][0]), kv[0][1])):
        total = sum(seconds for _, seconds in passes)
        big = [(name, s) for name, s in passes if s >= share * compile_s]
        rest = total - sum(s for _, s in big)
        parts = [f"{name} {_seconds(s)}" for name, s in big] + (
            [f"other {_seconds(rest)}"] if rest else [])
        lines.append(f"| `{recipe}` | {model} | {compile_s:.0f} | {', '.join(parts)} | "
                     f"{compile_s - total:.0f} |")
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def render(table: dict, scale: int, budget: float, command: str) -> str:
    models = sorted({m for row in table.values() for m in row})
    lines = [SECTION, "", f"`{command}`", "",
             f"Seconds per `fxquant.compile` at ×{scale} (calibration on the recipe's patches, "
             "range search, FSWA and reconstruction where the preset has them), as `fxquant "
             "table` stored them; 2 CPU cores, torch's default threads. The stores do not "
             "record the machine's load, so a time may include contention from another job. "
             "Two numbers: the fastest and slowest of several stored compiles (datasets "
             "computed in separate runs or by several configs, often with other code). "
             f"**Bold**: a compile over the {budget / 60:.0f}-minute budget.", "",
             "| preset | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for recipe in sorted(table, key=recipe_sort_key):
        cells = []
        for model in models:
            span = table[recipe].get(model)
            if span is None:
                cells.append("—")
                continue
            low, high = (f"{seconds:.0f}" for seconds in span)
            text = low if low == high else f"{low}–{high}"
            cells.append(f"**{text}**" if span[1] > budget else text)
        lines.append(f"| `{recipe}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="docs/results", help="folder of the JSON stores")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipes", help="comma-separated presets (default: all stored)")
    parser.add_argument("--budget", type=positive_float, default=900.0, help="seconds (default 900)")
    parser.add_argument("--write", help="replace the section of this Markdown file")
    args = parser.parse_args(argv)
    try:
        recipes = args.recipes.split(",") if args.recipes else None
        compiles = stored_compiles(load_all_stores(args.results), args.scale, recipes)
        table = cost_table(compiles)
        if not table:
            raise FxquantError(f"no stored result at x{args.scale} in {args.results}"
                               + (f" for {args.recipes}" if args.recipes else ""))
        command = "python tools/calibration_cost.py" + "".join(
            f" --{k} {v}" for k, v in (("scale", args.scale), ("recipes", args.recipes))
            if v is not None and not (k == "scale" and v == 4))
        text = render(table, args.scale, args.budget, command)
        split = pass_split(compiles)
        if split:
            text += render_split(split)
        if args.write:
            write_section(args.write, SECTION, text)
        print(text)
    except FxquantError as exc:
        print(f"calibration_cost: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
