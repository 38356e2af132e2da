"""Lowered models against their fake-quant models: per-layer agreement (in output steps) and
Set5 PSNR of the fake-quant, ``reference`` and ``cpu`` versions of each zoo model × preset.

    python tools/lower_check.py [--models imdn,pan,carn_m,fsrcnn] [--scale 4]
        [--recipes minmax-w8a8,...] [--json out.json] [--write docs/lowering.md]
        [--section "## Lowered vs fake-quant: I²NQ"]

Both lowered targets are built from the same calibrated fake-quant model (the ``lower`` pass
run on a copy), so any difference is the integer execution alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import torch

import fxquant
from fxquant.data import BenchmarkSet, to_tensor, to_y_tensor
from fxquant.lower.compare import layer_agreement
from fxquant.errors import FxquantError
from fxquant.files import atomic_write_text, check_output_path
from fxquant.markdown import write_section
from fxquant.models import get_spec
from fxquant.recipe import resolve_recipe
from fxquant.workflow import as_sr_function, evaluate_sets, prepare

PRESETS = ("minmax-w8a8", "mse-w8a8", "percentile-w8a8", "minmax-w6a6", "minmax-w4a4",
           "mse-w4a4", "percentile-w4a4")
MODELS = ("imdn", "pan", "carn_m", "fsrcnn")
SECTION = "## Lowered vs fake-quant"


def check(model: str, scale: int, recipe: str, data: str | None) -> dict:
    zoo = prepare(model, scale, recipe, data_root=data)
    fake = zoo.quant_model
    lowered = {t: fxquant.lowered_copy(fake, t) for t in ("reference", "cpu")}
    probe = [pair.lr for pair in BenchmarkSet("Set5", scale, root=data, limit=2)]
    to_input = to_y_tensor if zoo.spec.color == "y" else to_tensor
    probes = [to_input(lr) for lr in probe]
    row = {"model": model, "scale": scale, "recipe": recipe}
    for target, gm in lowered.items():
        agreement = layer_agreement(fake, gm, probes)
        row[f"{target}_max_steps"] = round(max(a.max_steps for a in agreement), 4)
        row["layers"] = len(agreement)
    runners = {"fake": fake, **lowered}
    for name, gm in runners.items():
        score = evaluate_sets(as_sr_function(gm, zoo.spec, scale), zoo.spec, scale, ["Set5"],
                              data_root=data)["Set5"]
        row[f"{name}_psnr"] = round(score.psnr, 4)
    return row


def render(rows: list[dict], command: str, section: str = SECTION) -> str:
    lines = [section, "", f"`{command}`", "",
             "Set5 PSNR of each version; per layer, the largest output difference between each "
             "integer conv and its fake-quant conv on the same input (the first two Set5 images "
             "through the fake-quant model), in output steps s_x·s_w.", "",
             "| model | recipe | integer convs | fake-quant PSNR | reference PSNR | cpu PSNR "
             "| Δ ref − fake | Δ cpu − ref | max layer diff ref / cpu (steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} ×{r['scale']} | {r['recipe']} | {r['layers']} | "
            f"{r['fake_psnr']:.4f} | {r['reference_psnr']:.4f} | {r['cpu_psnr']:.4f} | "
            f"{r['reference_psnr'] - r['fake_psnr']:+.4f} | "
            f"{r['cpu_psnr'] - r['reference_psnr']:+.4f} | {r['reference_max_steps']:.4f} / "
            f"{r['cpu_max_steps']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipes", default=",".join(PRESETS))
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--write", help="replace the section of this Markdown file")
    parser.add_argument("--section", default=SECTION,
                        help=f"the Markdown section to write (default '{SECTION}')")
    args = parser.parse_args(argv)
    try:  # before the (long) checks: a misspelt name or a missing folder fails now
        for path, what in ((args.json, "rows JSON (--json)"), (args.write, "Markdown (--write)")):
            if path:
                check_output_path(path, what)
        for model in args.models.split(","):
            get_spec(model)
        for recipe in args.recipes.split(","):
            resolve_recipe(recipe)
    except FxquantError as exc:
        print(f"lower_check: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            rows.append(check(model, args.scale, recipe, args.data))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    command = "python tools/lower_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(rows, command.strip(), args.section)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1), "rows JSON (--json)")
    if args.write:
        write_section(args.write, args.section, text)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
