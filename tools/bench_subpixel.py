"""A float strided transposed conv (FSRCNN's tail) as oneDNN's ConvTranspose2d and as the equal
sub-pixel conv the ``cpu`` lowering runs (fxquant/lower/subpixel.py).

    python tools/bench_subpixel.py [--channels 56] [--size 256] [--scale 4] [--rounds 7]

Both layouts of the input (NCHW, and the NHWC the integer convs produce), medians of
interleaved rounds; the outputs are checked equal first.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from fxquant.bench import interleaved, median_table, summarize
from fxquant.lower.subpixel import SubpixelConvTranspose2d


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, default=56)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    s = args.scale
    deconv = nn.ConvTranspose2d(args.channels, 1, 9, stride=s, padding=4, output_padding=s - 1)
    subpixel = SubpixelConvTranspose2d.from_conv_transpose(deconv)
    x = torch.randn(1, args.channels, args.size, args.size)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = deconv(x)
        scale = float(expected.abs().max())
        for got in (subpixel(x), subpixel(nhwc)):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)
        cases = {"ConvTranspose2d, NCHW": lambda: deconv(x),
                 "ConvTranspose2d, NHWC": lambda: deconv(nhwc),
                 "sub-pixel conv, NCHW": lambda: subpixel(x),
                 "sub-pixel conv, NHWC": lambda: subpixel(nhwc)}
        rows = summarize("deconv", interleaved(cases, args.rounds),
                         baseline="ConvTranspose2d, NCHW")
    print(f"1×{args.channels}×{args.size}×{args.size} float32 → 1 channel, 9×9 stride {s}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n")
    print(median_table(rows))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
