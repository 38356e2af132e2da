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


def cost_table(entries: dict, scale: int, recipes: list[str] | None) -> dict:
    """``{recipe: {model: seconds}}`` from stored cells (one compile per model × recipe)."""
    table: dict[str, dict[str, float]] = {}
    for entry in entries.values():
        recipe = entry["recipe"]
        if recipe == FP or entry["scale"] != scale or "compile_s" not in entry:
            continue
        if recipes and recipe not in recipes:
            continue
        table.setdefault(recipe, {})[entry["model"]] = entry["compile_s"]
    return table


def pass_split(entries: dict, scale: int, recipes: list[str] | None) -> dict:
    """``{(recipe, model): (compile_s, [[pass, seconds], ...])}`` for the cells that recorded their passes'
    wall times (``pass_s``, stored since the passes were timed)."""
    return {(e["recipe"], e["model"]): (e["compile_s"], e["pass_s"]) for e in entries.values()
            if e.get("pass_s") and e["scale"] == scale and (not recipes or e["recipe"] in recipes)}


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
             f"**Bold**: over the {budget / 60:.0f}-minute budget.", "",
             "| preset | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for recipe in sorted(table, key=recipe_sort_key):
        cells = []
        for model in models:
            seconds = table[recipe].get(model)
            text = "—" if seconds is None else f"{seconds:.0f}"
            cells.append(f"**{text}**" if seconds is not None and seconds > budget else text)
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
        entries = load_all_stores(args.results)
        table = cost_table(entries, args.scale, recipes)
        if not table:
            raise FxquantError(f"no stored result at x{args.scale} in {args.results}"
                               + (f" for {args.recipes}" if args.recipes else ""))
        command = "python tools/calibration_cost.py" + "".join(
            f" --{k} {v}" for k, v in (("scale", args.scale), ("recipes", args.recipes))
            if v is not None and not (k == "scale" and v == 4))
        text = render(table, args.scale, args.budget, command)
        split = pass_split(entries, args.scale, recipes)
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
