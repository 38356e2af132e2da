"""What ``lower{target=cpu,compile=true}`` costs over many input sizes, static (the
default: one compile per size, eager past Dynamo's limit of 8) or with ``dynamic=true`` (one
graph for every size). For each size in ``--sizes``, in order, on one compiled lowered copy:
the first call's seconds (the compile, if any), the graphs Dynamo compiled in it, the median
of three more calls, and the largest difference from the eager lowered model. ``--compare
S`` then times, side by side in interleaved rounds at a 1×C×S×S input, the static copy and
the ``dynamic=true`` one, each after one call at S.

    python tools/compile_sizes.py MODEL RECIPE [--scale 4] [--sizes 120x120,96x130,...]
        [--lower-options dynamic=true,planes=1,subset_codes=u8] [--compare 256] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch._dynamo.utils import counters

import fxquant
from fxquant.bench import interleaved
from fxquant.bench_table import cpu_description
from fxquant.cli_args import positive_int
from fxquant.errors import FxquantError
from fxquant.heap import keep_freed_blocks
from fxquant.passes.lower import LowerPass
from fxquant.upscale import lower_options
from fxquant.workflow import prepare

DEFAULT_SIZES = "120x120,96x130,64x64,50x70,128x100,97x131,111x111,100x100,77x133,125x90"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"HxW,HxW,..."`` → [(H, W), ...], each side at least 1."""
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise FxquantError(f"--sizes: '{item}' is not a size; give HxW pairs of positive "
                               "integers separated by commas, e.g. 120x120,96x130")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def size_rows(compiled, eager, channels: int, sizes) -> list[str]:
    """One table row per size: first call, graphs compiled, steady median, max |Δ| to eager."""
    rows, generator = [], torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for height, width in sizes:
            x = torch.rand(1, channels, height, width, generator=generator)
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            out = compiled(x)
            first = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"] - graphs
            steady = []
            for _ in range(3):
                start = time.perf_counter()
                compiled(x)
                steady.append(time.perf_counter() - start)
            diff = (out - eager(x)).abs().max().item()
            rows.append(f"| {height}×{width} | {first:.2f} | {graphs} | "
                        f"{1e3 * statistics.median(steady):.1f} | {diff:.2e} |")
    return rows


def compare(fake, options: dict, channels: int, size: int, rounds: int) -> str:
    """The static copy's kernels against the ``dynamic=true`` copy's, at S×S."""
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(1))
    static = fxquant.lowered_copy(fake, **{**options, "dynamic": False})
    dynamic = fxquant.lowered_copy(fake, **{**options, "dynamic": True})
    with torch.inference_mode():  # the compiles, outside the rounds
        static(x)
        dynamic(x)
    times = interleaved({"static": lambda: static(x), "dynamic": lambda: dynamic(x)}, rounds)
    per_round = [s / d for s, d in zip(times["static"], times["dynamic"])]
    return (f"at {size}×{size}, {rounds} interleaved rounds: static "
            f"{1e3 * statistics.median(times['static']):.1f} ms, dynamic "
            f"{1e3 * statistics.median(times['dynamic']):.1f} ms; static over dynamic time "
            f"{statistics.median(per_round):.3f} ({min(per_round):.3f}–{max(per_round):.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("recipe")
    parser.add_argument("--scale", type=positive_int, default=4)
    parser.add_argument("--sizes", default=DEFAULT_SIZES,
                        help="LR sizes HxW in the order they are run (default: ten sizes)")
    parser.add_argument("--lower-options", metavar="KEY=VALUE,...",
                        help="the lower pass's options besides target and compile")
    parser.add_argument("--compare", type=positive_int, metavar="S",
                        help="also time static against dynamic kernels at S×S")
    parser.add_argument("--rounds", type=positive_int, default=9)
    parser.add_argument("--data", default=None, help="data root (default $FXQUANT_DATA)")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    if "compile" in (args.lower_options or ""):
        raise FxquantError("--lower-options: compile is always true here; leave it out")
    options = lower_options("cpu", ",".join(["compile=true"] + ([args.lower_options]
                                                               if args.lower_options else [])))
    keep_freed_blocks()
    zoo = prepare(args.model, args.scale, args.recipe, data_root=args.data)
    channels = zoo.spec.channels
    eager = fxquant.lowered_copy(zoo.quant_model, **{**options, "compile": False,
                                                     "dynamic": False})
    compiled = fxquant.lowered_copy(zoo.quant_model, **options)
    print(f"{args.model} ×{args.scale} `{args.recipe}` lowered, "
          f"{LowerPass(**options).spec()}; "
          f"{cpu_description()}, torch threads {torch.get_num_threads()}\n")
    print("| LR size | first call s | graphs compiled | then ms | max abs diff to eager |\n"
          "|---|---:|---:|---:|---:|")
    print("\n".join(size_rows(compiled, eager, channels, sizes)))
    if args.compare:
        print("\n" + compare(zoo.quant_model, options, channels, args.compare, args.rounds))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
