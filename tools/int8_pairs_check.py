"""What oneDNN's saturating int8 pairs would cost a lowered model on this CPU, and what the
exact path that fxquant takes instead costs (fxquant/lower/int8_pairs.py).

    python tools/int8_pairs_check.py --model imdn --scale 4 --recipe mse-w8a8-sym-outputs

The compiled model is lowered to ``cpu`` twice: as fxquant lowers it on this CPU (two weight
planes wherever a u8 × s8 pair could saturate: CPUs without VNNI), and with the split turned
off (``FXQUANT_INT8_PAIRS=exact``: one plane, oneDNN's own arithmetic on this CPU). Prints one
JSON object: whether this CPU saturates, how many convs were split, the Set5 PSNR of FP,
fake-quant, ``reference`` and both ``cpu`` lowerings (eager), each lowering's largest
difference from ``reference`` on a random input in units of its output range, and the
compiled lowerings' median time per forward over FP32 eager, interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

import fxquant
from fxquant.cli_args import add_model_source_args, models_from_source_args, positive_int
from fxquant.errors import FxquantError
from fxquant.lower.conv import CpuConv2d
from fxquant.lower.int8_pairs import OVERRIDE, int8_pairs_saturate


@contextlib.contextmanager
def pairs_override(value: str | None):
    """``FXQUANT_INT8_PAIRS`` set to ``value`` (None: unset) inside the block only."""
    saved = os.environ.pop(OVERRIDE, None)
    if value is not None:
        os.environ[OVERRIDE] = value
    try:
        yield
    finally:
        os.environ.pop(OVERRIDE, None)
        if saved is not None:
            os.environ[OVERRIDE] = saved


def lowerings(fake, compile: bool) -> dict[str, torch.nn.Module]:
    """The ``cpu`` lowering as fxquant builds it here, and with one weight plane everywhere
    (the planes are packed when lowering, so the override matters only during it)."""
    with pairs_override(None):
        exact = fxquant.lowered_copy(fake, "cpu", compile=compile)
    with pairs_override("exact"):
        native = fxquant.lowered_copy(fake, "cpu", compile=compile)
    return {"cpu": exact, "cpu one plane": native}


def check(models, size: int, rounds: int, data_root=None) -> dict:
    from fxquant.bench import interleaved, summarize
    from fxquant.workflow import evaluate_sets

    fake = models.quant_model
    eager = {"reference": fxquant.lowered_copy(fake, "reference"), **lowerings(fake, False)}
    convs = [m for m in eager["cpu"].modules() if isinstance(m, CpuConv2d)]
    row = {"saturating_cpu": int8_pairs_saturate(), "convs": len(convs),
           "split_convs": sum(len(m._packed) > 1 for m in convs)}
    runners = {"fp": models.float_model, "fake": fake, **eager}
    row["psnr"] = {name: round(evaluate_sets(fn, models.spec, models.scale, ["Set5"],
                                             data_root=data_root)["Set5"].psnr, 4)
                   for name, fn in runners.items()}
    x = torch.rand(1, models.spec.channels, size, size)
    with torch.inference_mode():
        ref = eager["reference"](x)
        span = float(ref.max() - ref.min())
        row["max_diff_vs_reference"] = {name: float((eager[name](x) - ref).abs().max()) / span
                                        for name in ("cpu", "cpu one plane")}
    compiled = lowerings(fake, True)
    fns = {"fp32_eager": lambda: models.float_model(x),
           **{name: (lambda m=m: m(x)) for name, m in compiled.items()}}
    rows = summarize("model", interleaved(fns, rounds=rounds))
    row["timing"] = {r.variant: {"median_ms": round(r.median_ms, 1),
                                 "speed_up_vs_fp32": round(r.ratio, 2)} for r in rows}
    row["threads"] = torch.get_num_threads()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--size", type=positive_int, default=128, help="LR side for timing")
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    try:
        models = models_from_source_args(args)
        row = check(models, args.size, args.rounds, args.data)
    except FxquantError as exc:
        print(f"int8_pairs_check: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
