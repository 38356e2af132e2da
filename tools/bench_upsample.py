"""Bilinear upsampling by a scale factor (an SR model's global skip, as in PAN): ATen's kernel,
Inductor's generated one, and the opaque ``fxquant::upsample`` inside a compiled graph.

    python tools/bench_upsample.py [--channels 3] [--size 128] [--scale 4] [--rounds 20]

Why the ``cpu`` lowering routes bilinear/bicubic ``F.interpolate`` through the custom op
(fxquant/lower/ops.py). Each case is upsample + add of an output-sized tensor (PAN's
``out + ILR``), medians of interleaved rounds; the outputs are checked equal first.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from fxquant.bench import interleaved, median_table, summarize
from fxquant.lower import ops  # noqa: F401 - registers fxquant::upsample


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    s = args.scale
    x = torch.rand(1, args.channels, args.size, args.size)
    y = torch.rand(1, args.channels, args.size * s, args.size * s)

    def aten(t, o):
        return o + F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=False)

    inductor = torch.compile(aten, dynamic=False)
    opaque = torch.compile(lambda t, o: o + torch.ops.fxquant.upsample(t, float(s), "bilinear",
                                                                       False), dynamic=False)
    with torch.inference_mode():
        expected = aten(x, y)
        for fn in (inductor, opaque):
            torch.testing.assert_close(fn(x, y), expected)
        cases = {"aten (eager)": lambda: aten(x, y), "inductor-generated": lambda: inductor(x, y),
                 "fxquant::upsample in a compiled graph": lambda: opaque(x, y)}
        rows = summarize("upsample", interleaved(cases, args.rounds), baseline="aten (eager)")
    print(f"1×{args.channels}×{args.size}×{args.size} float32, bilinear ×{s} + add, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n")
    print(median_table(rows))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
