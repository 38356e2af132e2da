"""Where a compiled lowered model's forward spends its wall time: each compiled region (one
Inductor graph, called once or many times per forward: the codes kernels, the float ops
around them, the folded convs' per-image weight fold) and the eager part of DAQ's and DFSQ's
folded convs (the oneDNN prepack and int8 conv, the offset term's border strips), timed by
wrapping the calls.

One compile of ``RECIPE`` for ``MODEL`` (pretrained, its recipe's calibration patches),
``lower{target=cpu,compile=true}`` (DFSQ's ``planes`` and ``subset_codes`` as given), a random
1×C×S×S input, warm-up, then ``--rounds`` forwards; torch's threads, freed blocks kept on the
heap as ``fxquant bench``. The times are wall clock on the calling thread, so a region's
includes its kernels' parallel work; the rest of the forward (Dynamo's entry and guards,
Python between the calls) is what the parts leave.

    python tools/lowered_parts.py MODEL RECIPE [--scale 4] [--size 256] [--rounds 7]
        [--planes 1] [--subset-codes exact|u8]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

import fxquant
from fxquant.bench_table import cpu_description, heap_description
from fxquant.cli_args import (add_lowered_timing_args, lowered_timing_options,
                               prepare_lowered_timing)
from fxquant.lower.folded import CpuDaqConv2d
from fxquant.passes.lower import LowerPass

FOLDED = "folded convs (eager)"
INT8 = "  of which the int8 conv (per-image prepack, oneDNN qconv_pointwise)"


def region_label(graph) -> str:
    """A compiled graph's name for the table: its first fused kernel (Inductor names them by
    the ops they hold) and how many more it runs."""
    kernels = list(dict.fromkeys(re.findall(r"\bcpp_fused_\w+", graph.source_code or "")))
    if not kernels:
        return f"graph {graph.cache_key[:8]} (no fused kernel)"
    more = f" +{len(kernels) - 1} more" if len(kernels) > 1 else ""
    return f"{kernels[0][:64]}…{more} [{graph.cache_key[:6]}]"


@contextmanager
def timed_parts(acc: dict[str, list[float]]):
    """Wrap ``CompiledFxGraph.__call__``, the cpu folded conv's forward and its per-image
    int8 conv (prepack and oneDNN conv) so that each call adds its wall time and count to
    ``acc[label]``; undone on exit."""
    from torch._inductor.output_code import CompiledFxGraph

    def wrap(fn, label_of):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            entry = acc[label_of(args)]
            entry[0] += time.perf_counter() - start
            entry[1] += 1
            return out
        return timed

    saved = (CompiledFxGraph.__call__, CpuDaqConv2d.forward, CpuDaqConv2d.image_conv)
    CompiledFxGraph.__call__ = wrap(saved[0], lambda args: region_label(args[0]))
    # disabled as the forward it wraps is (Dynamo breaks the graph at the call, as without
    # it); the fold and a small map's float conv (prepare) are traced into the regions
    CpuDaqConv2d.forward = torch.compiler.disable(wrap(saved[1], lambda args: FOLDED))
    CpuDaqConv2d.image_conv = wrap(saved[2], lambda args: INT8)
    try:
        yield acc
    finally:
        CompiledFxGraph.__call__, CpuDaqConv2d.forward, CpuDaqConv2d.image_conv = saved


def measure(lowered, example: torch.Tensor, rounds: int) -> tuple[list[float], dict]:
    """``(forward times, {label: [seconds, calls]})`` over ``rounds`` forwards after warm-up
    (the parts summed over the rounds)."""
    acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    with torch.inference_mode(), timed_parts(acc):
        for _ in range(2):  # compiles with the timers in place
            lowered(example)
        acc.clear()
        totals = []
        for _ in range(rounds):
            start = time.perf_counter()
            lowered(example)
            totals.append(time.perf_counter() - start)
    return totals, dict(acc)


def render(totals: list[float], parts: dict, rounds: int) -> str:
    forward = statistics.mean(totals)
    lines = [f"forward: median {1e3 * statistics.median(totals):.1f} ms, mean "
             f"{1e3 * forward:.1f} ms\n", "| part | ms per forward | calls | ms per call |",
             "|---|---:|---:|---:|"]
    accounted = 0.0
    for label, (seconds, calls) in sorted(parts.items(), key=lambda kv: -kv[1][0]):
        if label != INT8:
            accounted += seconds / rounds
        lines.append(f"| `{label}` | {1e3 * seconds / rounds:.2f} | {calls // rounds} | "
                     f"{1e3 * seconds / calls:.2f} |")
    lines.append(f"| the rest of the forward | {1e3 * (forward - accounted):.2f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_lowered_timing_args(parser, rounds=7)
    args = parser.parse_args(argv)
    zoo, example = prepare_lowered_timing(args)
    options = lowered_timing_options(zoo.quant_model, args.planes, args.subset_codes)
    lowered = fxquant.lowered_copy(zoo.quant_model, **options)
    totals, parts = measure(lowered, example, args.rounds)
    print(f"{args.model} ×{args.scale} `{args.recipe}`, {LowerPass(**options).spec()}, "
          f"1×{zoo.spec.channels}×{args.size}² input, {cpu_description()}, torch threads "
          f"{torch.get_num_threads()}, {heap_description()}, {args.rounds} forwards after "
          "warm-up\n")
    print(render(totals, parts, args.rounds))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
