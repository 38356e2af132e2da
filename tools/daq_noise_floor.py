"""Float-noise floor of a DAQ fake-quant model's Set5 PSNR: the same fake-quant model at 2 and
1 intra-op threads (another float32 summation order in its convs) and run in float64.

    python tools/daq_noise_floor.py pan daq-w4a4

Prints one JSON row. With dynamic per-(image, channel) statistics a 1e-7 relative change of
one layer's output moves the next layer's μ and σ and flips codes at rounding ties; through
many layers this sets how closely any other execution (the lowered ``reference``) can agree
with the float32 fake-quant model by PSNR (docs/lowering.md, "DAQ lowered").
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from fxquant.workflow import as_sr_function, evaluate_sets, prepare


def main(argv: list[str] | None = None) -> int:
    model, recipe = (argv if argv is not None else sys.argv[1:])[:2]
    zoo = prepare(model, 4, recipe)
    fake = zoo.quant_model

    def psnr(gm, double: bool = False) -> float:
        fn = as_sr_function(gm, zoo.spec, 4)
        run = (lambda x: fn(x.double()).float()) if double else fn
        return round(evaluate_sets(run, zoo.spec, 4, ["Set5"])["Set5"].psnr, 4)

    row = {"model": model, "recipe": recipe}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        row[f"fake_fp32_{threads}thr"] = psnr(fake)
    torch.set_num_threads(2)
    row["fake_fp64"] = psnr(copy.deepcopy(fake).double(), double=True)
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
