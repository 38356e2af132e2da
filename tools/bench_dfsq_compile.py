"""Whole-model DFSQ compile time per zoo model: calibration patches, trace, observe,
calibrate, point selection, weights, verify.

    FXQUANT_DATA=... .venv/bin/python tools/bench_dfsq_compile.py [--models imdn,pan,carn_m]
        [--scales 4] [--recipes dfsq-w4a4] [--threads N]

Prints a Markdown table: total wall time of ``fxquant.compile`` (patches drawn beforehand,
timed separately), the point-selection part (``select_s`` of ``subset-quant``), the
number of quantized layers and channels, and the samples per channel.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import fxquant
from fxquant.models import build_model, get_spec
from fxquant.quant.subset import SubsetQuantizer
from fxquant.recipe import resolve_recipe
from fxquant.workflow import calibration_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="imdn,pan,carn_m")
    parser.add_argument("--scales", default="4")
    parser.add_argument("--recipes", default="dfsq-w4a4")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's, i.e. the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
          f"load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| model | scale | recipe | layers | channels | samples/channel | patches | "
          "compile | of which point selection |")
    print("|---|---|---|---|---|---|---|---|---|")
    for recipe_name in args.recipes.split(","):
        recipe = resolve_recipe(recipe_name)
        for name in args.models.split(","):
            spec = get_spec(name)
            for scale in (int(s) for s in args.scales.split(",")):
                started = time.perf_counter()
                calib = calibration_data(spec, scale, recipe)
                patches_s = time.perf_counter() - started
                model = build_model(name, scale, pretrained=True)
                started = time.perf_counter()
                gm = fxquant.compile(model, recipe, calib=calib,
                                     concrete_args={"scale": scale} if spec.takes_scale else None)
                compile_s = time.perf_counter() - started
                history = dict(gm.fxquant_history)
                quantizers = [m for m in gm.modules() if isinstance(m, SubsetQuantizer)]
                print(f"| {name} | x{scale} | {recipe_name} | {len(quantizers)} | "
                      f"{sum(q.channels for q in quantizers)} | "
                      f"{history['dfsq-observe']['samples_per_channel']} | {patches_s:.1f} s | "
                      f"{compile_s:.1f} s | {history['subset-quant']['select_s']:.1f} s |",
                      flush=True)


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
