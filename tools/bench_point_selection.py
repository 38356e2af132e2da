"""Time DFSQ's point selection: K-means (the paper's fast strategy) vs exhaustive search.

Both run on the same data: the normalized calibration values of one channel of one real
layer (IMDN ×4 by default; 32 T91 + General100 patches of 48×48, as the dfsq presets
calibrate). The universal set grows with the number of words of the official pattern
(1..5 words: 7, 29, 107, 377, 1295 values); bits pick k = 2^b points. Exhaustive search
enumerates every k-subset with exact errors from prefix sums (by default only the subsets
holding 0, the feasible set of DFSQ's K-means with its pinned centre: C(|U|−1, k−1) of
them); each run is capped by ``--budget`` seconds and, when stopped early, its full time is
extrapolated linearly from the subsets evaluated per second (marked "≈"). K-means uses the
recipe defaults (5 restarts, 100 iterations, pinned 0, snap, collision resolution).

    FXQUANT_DATA=... .venv/bin/python tools/bench_point_selection.py [--budget 20] [--words 1,2,3,4,5]
"""

from __future__ import annotations

import argparse
import time

import torch

import fxquant
from fxquant.cli_args import positive_float
from fxquant.models import build_model, get_spec
from fxquant.pipeline import PassContext, PassManager
from fxquant.quant.exhaustive_selection import exhaustive_select, subset_count
from fxquant.quant.point_selection import kmeans_select
from fxquant.quant.subset import SampleObserver
from fxquant.quant.universal_set import universal_set
from fxquant.recipe import load_preset
from fxquant.workflow import calibration_data


def layer_samples(model: str, scale: int, layer: str, channel: int, max_samples: int) -> torch.Tensor:
    recipe = load_preset("dfsq-w4a4").to_dict()
    recipe["layers"] = {"include": [layer]}
    recipe["options"].update({"max_samples": max_samples, "memory_mb": 4096.0})
    recipe = fxquant.Recipe.from_dict(recipe)
    spec = get_spec(model)
    ctx = PassContext(recipe, calib=calibration_data(spec, scale, recipe),
                      concrete_args={"scale": scale} if spec.takes_scale else None)
    gm = PassManager("trace,dfsq-observe,calibrate").run(build_model(model, scale, pretrained=True), ctx)
    (observer,) = [m for m in gm.modules() if isinstance(m, SampleObserver)]
    return observer.normalized_samples()[channel:channel + 1], observer.post_relu


def fmt_seconds(s: float, exact: bool) -> str:
    prefix = "" if exact else "≈"
    if s < 1:
        return f"{prefix}{s * 1e3:.1f} ms"
    if s < 3600:
        return f"{prefix}{s:.1f} s"
    if s < 86400 * 365:
        return f"{prefix}{s / 3600:.3g} h"
    return f"{prefix}{s / (86400 * 365):.3g} years"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imdn")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--layer", default="IMDB1.c2")
    parser.add_argument("--channel", type=int, default=0)
    parser.add_argument("--samples", type=int, default=16384,
                        help="calibration values of the channel (the recipes' per-channel cap)")
    parser.add_argument("--words", default="1,2,3,4,5")
    parser.add_argument("--bits", default="1,2,3,4")
    parser.add_argument("--budget", type=positive_float, default=20.0,
                        help="seconds per exhaustive run before extrapolating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-pin-zero", action="store_true",
                        help="exhaustive over all k-subsets (default: those holding 0, the same "
                             "feasible set as DFSQ's K-means with its pinned centre)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    samples, post_relu = layer_samples(args.model, args.scale, args.layer, args.channel, args.samples)
    print(f"data: {args.model} x{args.scale} layer {args.layer} channel {args.channel} "
          f"({samples.shape[1]} normalized calibration values, post_relu={post_relu}); "
          f"torch threads {args.threads}; exhaustive budget {args.budget:g} s per run\n")
    subsets = "C(\\|U\\|−1,k−1)" if not args.no_pin_zero else "C(\\|U\\|,k)"
    print(f"| words | \\|U\\| | bits | k | subsets {subsets} | exhaustive | K-means | "
          "MSE exhaustive | MSE K-means |")
    print("|---|---|---|---|---|---|---|---|---|")
    for words in (int(w) for w in args.words.split(",")):
        u = universal_set(words)
        for bits in (int(b) for b in args.bits.split(",")):
            k = 2 ** bits
            if k > u.numel():
                continue
            pin = not args.no_pin_zero
            total = subset_count(u.numel(), k, pin)
            started = time.perf_counter()
            km = kmeans_select(samples, u, k)
            km_s = time.perf_counter() - started
            started = time.perf_counter()
            ex = exhaustive_select(samples, u, k, pin_zero=pin, time_budget=args.budget)
            ex_s = time.perf_counter() - started
            if not ex.complete:
                ex_s = ex_s * total / max(ex.evaluated, 1)
            ex_mse = f"{float(ex.mse[0]):.3e}" if ex.complete else \
                f"{float(ex.mse[0]):.3e} (best of first {ex.evaluated:.2g})"
            print(f"| {words} | {u.numel()} | {bits} | {k} | {total:.3g} | "
                  f"{fmt_seconds(ex_s, ex.complete)} | {fmt_seconds(km_s, True)} | {ex_mse} | "
                  f"{float(km.mse[0]):.3e} |", flush=True)


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
