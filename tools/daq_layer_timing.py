"""One DAQ conv lowered for the cpu target, step by step: 64→64 3×3 on 1×64×S×S, 2 threads,
medians of 10 calls (no interleaving: a quick breakdown, not a benchmark).

    python tools/daq_layer_timing.py [S]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fxquant.cli_args import positive_int
from fxquant.lower.daq import DaqQuantize
from fxquant.lower.folded import CpuDaqConv2d, requantize_folded
from fxquant.quant import QuantConv2d
from fxquant.quant.daq import DAQActivationQuantizer
from fxquant.quant.daq_weights import DAQWeightQuantizer


def median_ms(fn, rounds: int = 10) -> float:
    fn(), fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="?", type=positive_int, default=256,
                        help="the input's height and width (default 256)")
    size = parser.parse_args(argv).size
    torch.set_num_threads(2)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    qconv = QuantConv2d(conv, DAQWeightQuantizer(conv.weight.shape, 4, step_index="initial"))
    codes = DaqQuantize.from_quantizer(DAQActivationQuantizer(64, 4), True)
    layer = CpuDaqConv2d.from_quantized(qconv)
    x = torch.randn(1, 64, size, size)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        packed = codes(x)
        q, step, _, _ = packed
        wc, ws = requantize_folded(layer.folded_weight(step, layer.weight(torch.float32)))
        zp = torch.zeros(64, dtype=torch.int64)

        def prepack(shape):
            return torch.ops.onednn.qconv_prepack(wc[0].contiguous(), ws[0].contiguous(), 1.0, 0,
                                                  [1, 1], [1, 1], [1, 1], 1, shape)

        def qconv_with(pk):
            return lambda: torch.ops.onednn.qconv_pointwise(
                q, 1.0, 0, pk, ws[0], zp, None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0,
                torch.float32, "none", [None], "")

        compiled = torch.compile(codes)
        rows = {"fp32 conv NCHW": lambda: conv(x), "fp32 conv NHWC": lambda: conv(xl),
                "DAQ codes, eager": lambda: codes(x), "DAQ codes, compiled": lambda: compiled(x),
                "fold + requantize": lambda: requantize_folded(
                    layer.folded_weight(step, layer.weight(torch.float32))),
                "prepack": lambda: prepack([1, 64, size, size]),
                "qconv, weight packed for the input shape": qconv_with(prepack([1, 64, size, size])),
                "qconv, weight packed without the shape": qconv_with(prepack(None))}
        for planes in (1, 2):
            def run(planes=planes):
                layer.weight_planes = planes
                return layer(packed)
            rows[f"lowered conv, {planes} weight plane(s)"] = run
        print(f"| 1×64×{size}² step | ms |\n|---|---|")
        for name, fn in rows.items():
            print(f"| {name} | {median_ms(fn):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
