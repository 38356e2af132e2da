"""IMDN ×4 daq-w4a4 at 256²: FP32 eager vs lowered cpu (compiled) with 2 and 1 int8 weight
planes, the 1-plane model with its 384-channel concat coded whole (the lower pass's
``dynamic_cat_pieces`` rewrite switched off), and lowered cpu eager (1 plane); interleaved rounds
(default 9), medians of the times and of the per-round FP32/variant ratios
(fxquant.bench.interleaved). Needs $FXQUANT_DATA.

    python tools/daq_bench_planes.py [ROUNDS]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fxquant
import fxquant.passes.lower as lower_pass
from fxquant.bench import interleaved
from fxquant.cli_args import positive_int
from fxquant.workflow import prepare


def variants(fake, float_model) -> dict:
    v = {"fp32_eager": float_model.eval(),
         "cpu compiled, 2 planes": fxquant.lowered_copy(fake, "cpu", compile=True, planes=2),
         "cpu compiled, 1 plane": fxquant.lowered_copy(fake, "cpu", compile=True, planes=1)}
    pieces = lower_pass.dynamic_cat_pieces
    lower_pass.dynamic_cat_pieces = lambda gm: 0  # the concat quantized whole, as before the rewrite
    try:
        v["cpu compiled, 1 plane, concat coded whole"] = fxquant.lowered_copy(
            fake, "cpu", compile=True, planes=1)
    finally:
        lower_pass.dynamic_cat_pieces = pieces
    v["cpu eager, 1 plane"] = fxquant.lowered_copy(fake, "cpu", planes=1)
    return v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=positive_int, default=9)
    rounds = parser.parse_args(argv).rounds
    torch.set_num_threads(2)
    zoo = prepare("imdn", 4, "daq-w4a4")
    x = torch.rand(1, 3, 256, 256)
    v = variants(zoo.quant_model, zoo.float_model)
    with torch.inference_mode():
        for m in v.values():
            m(x)
        times = interleaved({k: (lambda m=m: m(x)) for k, m in v.items()}, rounds)
    base = times["fp32_eager"]
    print(f"IMDN ×4 daq-w4a4, 1×3×256×256, torch threads 2, {rounds} interleaved rounds\n")
    print("| variant | median | vs FP32 eager (median per round) |\n|---|---|---|")
    for k, t in times.items():
        print(f"| {k} | {1e3 * statistics.median(t):.1f} ms | "
              f"{statistics.median([b / a for b, a in zip(base, t)]):.2f}× |")
    whole, piece = times["cpu compiled, 1 plane, concat coded whole"], times["cpu compiled, 1 plane"]
    print(f"\nconcat coded by piece against whole, median per-round speed-up: "
          f"{statistics.median([a / b for a, b in zip(whole, piece)]):.3f}×")
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
