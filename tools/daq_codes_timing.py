"""The compiled DAQ codes of one IMDN-shaped layer, with the per-channel parameters stored once
(fxquant.lower.daq.daq_input_codes) against the same arithmetic with them left for Inductor to
inline into the per-pixel loop (the form before the change): the conv output 1×64×S×S NHWC,
leaky ReLU 0.05, split 16/48, signed 4-bit codes of the 48 channels balanced to 128, as IMDN's
c2–c4 inputs. Checks that both give the same codes, then interleaved rounds (default 15),
2 threads, medians.

    python tools/daq_codes_timing.py [S] [ROUNDS]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fxquant.bench import interleaved
from fxquant.cli_args import positive_int
from fxquant.lower.daq import _piece_codes, balanced_multipliers, daq_input_codes
from fxquant.quant.daq import _daq_params


def stored(x: torch.Tensor):
    act = torch.nn.functional.leaky_relu(x, 0.05)
    kept, rest = torch.split(act, (16, 48), 1)
    q, step, offset, _ = daq_input_codes(rest, 4, "signed", strict=False, balance=128,
                                      dtype=torch.uint8)
    return kept, q, step, offset


def inlined(x: torch.Tensor):
    act = torch.nn.functional.leaky_relu(x, 0.05)
    kept, rest = torch.split(act, (16, 48), 1)
    mu, safe, valid, finite, h = _daq_params([rest], 4, "signed", 0, "head")
    step = torch.where(finite, safe * valid, torch.full_like(safe, float("nan")))
    m = balanced_multipliers(step, 2 * h, 128)
    q = _piece_codes(rest, mu, safe, m, h, "signed").to(torch.uint8)
    return kept, q, step / m, mu - h * step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="?", type=positive_int, default=256,
                        help="the conv output's height and width (default 256)")
    parser.add_argument("rounds", nargs="?", type=positive_int, default=15)
    args = parser.parse_args(argv)
    size, rounds = args.size, args.rounds
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(1, 64, size, size).contiguous(memory_format=torch.channels_last)
    forms = {"parameters stored once": torch.compile(stored),
             "parameters inlined per pixel": torch.compile(inlined)}
    with torch.inference_mode():
        outs = [f(x) for f in forms.values()]
        same = all(torch.equal(a, b) for a, b in zip(*outs))
        times = interleaved({k: (lambda f=f: f(x)) for k, f in forms.items()}, rounds)
    print(f"IMDN-shaped DAQ codes, 1×64×{size}² NHWC → 48-channel codes, torch threads 2, "
          f"{rounds} interleaved rounds; same codes, steps and offsets: {same}\n")
    print("| form | median ms |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} |")
    a, b = times.values()
    print(f"\nstored against inlined, median per-round speed-up: "
          f"{statistics.median([y / x for x, y in zip(a, b)]):.2f}×")
    return 0 if same else 1


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
