"""Re-run stored results and compare: does the current code reproduce docs/results.md?

    python tools/results_check.py [--scale 4] [--dataset Set5] [--models imdn,pan,carn_m]
        [--recipes daq-w4a4,...] [--tol 0.01] [--data PATH]

Reads every ``docs/results/*.json`` store, re-evaluates the matching (model, scale, recipe,
dataset, whole set) entries and prints stored vs now; exits 1 when one moved by more than
``--tol`` dB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxquant.cli_args import non_negative_float
from fxquant.errors import FxquantError
from fxquant.results import load_all_stores
from fxquant.workflow import evaluate_sets, prepare

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--models", help="comma-separated (default: every stored model)")
    parser.add_argument("--recipes", help="comma-separated (default: every stored recipe)")
    parser.add_argument("--tol", type=non_negative_float, default=0.01)
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    args = parser.parse_args(argv)
    whole_sets = [r for r in load_all_stores(RESULTS).values()
                  if r["scale"] == args.scale and r["dataset"] == args.dataset
                  and r["limit"] is None and r["recipe"] != "fp"]
    stored = [r for r in whole_sets
              if (not args.models or r["model"] in args.models.split(","))
              and (not args.recipes or r["recipe"] in args.recipes.split(","))]
    if not stored:  # checking nothing would pass: say what there is to check instead
        raise FxquantError(
            f"no stored result matches x{args.scale} {args.dataset}"
            + (f", --models {args.models}" if args.models else "")
            + (f", --recipes {args.recipes}" if args.recipes else "")
            + f"; stored for x{args.scale} {args.dataset}: models "
            f"{', '.join(sorted({r['model'] for r in whole_sets})) or 'none'}, recipes "
            f"{', '.join(sorted({r['recipe'] for r in whole_sets})) or 'none'}")
    worst = 0.0
    print("| model | recipe | stored PSNR | now | Δ |\n|---|---|---|---|---|")
    for row in sorted(stored, key=lambda r: (r["model"], r["recipe"])):
        zoo = prepare(row["model"], row["scale"], row["recipe"], data_root=args.data)
        now = evaluate_sets(zoo.runner("quant"), zoo.spec, row["scale"], [args.dataset],
                            data_root=args.data)[args.dataset].psnr
        delta = now - row["psnr"]
        worst = max(worst, abs(delta))
        print(f"| {row['model']} | {row['recipe']} | {row['psnr']:.4f} | {now:.4f} | "
              f"{delta:+.4f} |", flush=True)
    print(f"\n{len(stored)} entries, largest |Δ| {worst:.4f} dB (tolerance {args.tol})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
