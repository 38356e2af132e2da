"""Per-layer error attribution and the sensitivity sweep of a quantized zoo model.

    python tools/layer_error.py --model imdn --scale 4 --recipe minmax-w4a4
    python tools/layer_error.py --compiled m.fxq --sweep --strategy all-but --json

Prints each quantized layer's SQNR/MSE against the float layer of the same name, isolated
(fed the float input: local error, with weight-only and activation-only parts) and propagated
(the quantized model's own activations: cumulative error), worst first; with ``--sweep`` the
output SQNR with one layer quantized at a time (or all but one). Inputs are centred LR crops
of the first images of a benchmark set. Set OMP_NUM_THREADS=1 on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys

from fxquant.cli_args import (add_model_source_args, models_from_source_args, non_negative_int,
                              positive_int)
from fxquant.errors import FxquantError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--images", type=positive_int, default=2, help="first N images (default 2)")
    parser.add_argument("--crop", type=non_negative_int, default=48, help="LR crop side, 0 = whole image")
    parser.add_argument("--sort", default="isolated", choices=("isolated", "propagated", "graph"))
    parser.add_argument("--sweep", action="store_true", help="run the sensitivity sweep")
    parser.add_argument("--strategy", default="only", choices=("only", "all-but"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        from fxquant.analysis import benchmark_crops, layer_errors
        from fxquant.sensitivity import rank_agreement, sensitivity_sweep
        models = models_from_source_args(args, [args.dataset])
        inputs, names = benchmark_crops(args.dataset, models.scale, images=args.images,
                                        crop=args.crop, color=models.spec.color, root=args.data)
        fns = {"float_fn": models.runner("fp"), "quant_fn": models.runner("quant")}
        errors = layer_errors(models.float_model, models.quant_model, inputs, **fns)
        sweep = (sensitivity_sweep(models.float_model, models.quant_model, inputs,
                                   strategy=args.strategy, **fns) if args.sweep else None)
    except FxquantError as exc:
        print(f"layer_error: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = {"inputs": names, "crop": args.crop, "layers": errors.to_dict()}
        if sweep is not None:
            out["sweep"] = sweep.to_dict()
            out["agreement"] = rank_agreement(errors, sweep)
        print(json.dumps(out, default=float))
        return 0
    where = f"centred {args.crop}x{args.crop} LR crops of " if args.crop else ""
    print(f"per-layer error on {where}{', '.join(names)} ({args.dataset})")
    print(errors.table(sort=None if args.sort == "graph" else args.sort), end="")
    if sweep is not None:
        print()
        print(sweep.table(), end="")
        agreement = rank_agreement(errors, sweep)
        print(f"agreement with the isolated ranking: top-5 overlap {agreement['overlap5']}/5, "
              f"most sensitive layer is #{agreement['sweep_worst_isolated_rank']} by isolated "
              f"SQNR, Spearman {agreement['spearman']:.2f}")
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
