"""Pixel shuffle of a channels-last tensor (the layout oneDNN's convs produce): ATen's kernel,
Inductor's generated one, and the opaque ``fxquant::pixel_shuffle`` inside a compiled graph.

    python tools/bench_pixel_shuffle.py [--channels 256] [--size 256] [--rounds 5]

Why the ``cpu`` lowering routes pixel shuffles through the custom op (fxquant/lower/ops.py).
Each case is shuffle + ReLU (what follows CARN-M's upsampler), medians of interleaved rounds.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fxquant.bench import interleaved, median_table, summarize
from fxquant.lower import ops  # noqa: F401 - registers fxquant::pixel_shuffle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    x = torch.randn(1, args.channels, args.size, args.size).contiguous(
        memory_format=torch.channels_last)
    inductor = torch.compile(lambda t: torch.relu(F.pixel_shuffle(t, 2)), dynamic=False)
    opaque = torch.compile(lambda t: torch.relu(torch.ops.fxquant.pixel_shuffle(t, 2)),
                           dynamic=False)
    with torch.inference_mode():
        expected = torch.relu(F.pixel_shuffle(x, 2))
        for fn in (inductor, opaque):
            assert torch.equal(fn(x), expected)
    cases = {"aten (eager)": lambda: torch.relu(F.pixel_shuffle(x, 2)),
             "inductor-generated": lambda: inductor(x),
             "fxquant::pixel_shuffle in a compiled graph": lambda: opaque(x)}
    rows = summarize("pixel_shuffle", interleaved(cases, args.rounds), baseline="aten (eager)")
    print(f"1×{args.channels}×{args.size}×{args.size} float32, channels-last, ×2 shuffle + ReLU, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n")
    print(median_table(rows))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
