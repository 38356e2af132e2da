"""Per-forward time and minor page faults of FP32 eager and a cpu-lowered model, interleaved in
one process: what keeping freed blocks on glibc's heap (fxquant/heap.py; the default once a
model is lowered for the cpu) saves an SR forward.

    python tools/forward_faults.py [--model imdn] [--recipe daq-w4a4] [--planes 1]
        [--size 256] [--rounds 5]
    FXQUANT_KEEP_HEAP=0 python tools/forward_faults.py ...      # glibc's default thresholds

The setting is per process, so the comparison is two commands. Each prints a Markdown table:
per variant the median milliseconds and the median minor page faults of one forward (a fault
is a 4 KiB page the kernel maps and zero-fills on first touch), over interleaved rounds after
two warm-up calls each. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time

import torch

import fxquant
from fxquant.bench_table import heap_description
from fxquant.cli_args import positive_int
from fxquant.heap import keep_freed_blocks
from fxquant.workflow import prepare


def one_call(fn, x: torch.Tensor) -> tuple[float, int]:
    """Milliseconds and minor page faults of ``fn(x)``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn(x)
    seconds = time.perf_counter() - start
    return 1e3 * seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def measure(fns: dict, x: torch.Tensor, rounds: int) -> dict[str, tuple[float, float]]:
    """``{name: (median ms, median faults)}`` over ``rounds`` interleaved rounds."""
    samples = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x), fn(x)
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name].append(one_call(fn, x))
    return {name: (statistics.median(s[0] for s in values),
                   statistics.median(s[1] for s in values)) for name, values in samples.items()}


def render(results: dict, args: argparse.Namespace) -> str:
    lines = [f"{args.model} ×{args.scale}, 1×C×{args.size}² LR input, lowered `{args.recipe}` "
             f"(cpu, compiled, {args.planes} weight plane(s)), torch threads "
             f"{torch.get_num_threads()}, {heap_description()}, {args.rounds} interleaved "
             "rounds", "", "| variant | median ms | minor faults per forward |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {faults:,.0f} |" for name, (ms, faults) in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="imdn")
    parser.add_argument("--scale", type=positive_int, default=4)
    parser.add_argument("--recipe", default="daq-w4a4")
    parser.add_argument("--planes", type=int, choices=(1, 2), default=1)
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    args = parser.parse_args(argv)
    keep_freed_blocks()  # before either variant runs (FXQUANT_KEEP_HEAP=0: glibc's defaults)
    zoo = prepare(args.model, args.scale, args.recipe, data_root=args.data)
    lowered = fxquant.lowered_copy(zoo.quant_model, "cpu", compile=True, planes=args.planes)
    fns = {"fp32 eager": copy.deepcopy(zoo.float_model).eval(), "lowered cpu": lowered}
    x = torch.rand(1, 1 if zoo.spec.color == "y" else 3, args.size, args.size)
    print(render(measure(fns, x, args.rounds), args))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
