"""A whole lowered model's compiled codes kernels two ways, side by side in one process: the
branch-free search of the midpoints that ``lower{target=cpu,compile=true}`` runs for DFSQ's
subset points and I²NQ's grid levels up to :data:`fxquant.lower.search.THRESHOLD_BITS`
(fxquant/lower/search.py), against the table's gather, the eager form, which Inductor runs
one element at a time (every codes module's ``compiled_codes`` set to ``table`` in that
copy). Beside them FP32
eager and the fake-quant model. One compile of ``RECIPE`` for ``MODEL`` (pretrained, its
recipe's calibration patches), a random 1×C×S×S input, interleaved rounds (default 9) after
warm-up, torch's threads, freed blocks kept on the heap as ``fxquant bench``; checks that the
two lowered copies give the same output bit for bit, then prints median milliseconds and the
ratios, round by round, of the search over the table and over the fake-quant model.

    python tools/codes_search_ab.py MODEL RECIPE [--scale 4] [--size 256] [--rounds 9]
        [--planes 1] [--subset-codes exact|u8]
"""

from __future__ import annotations

import argparse
import statistics
from copy import deepcopy

import torch

import fxquant
from fxquant.bench import interleaved
from fxquant.bench_table import cpu_description, heap_description
from fxquant.cli_args import (add_lowered_timing_args, lowered_timing_options,
                               prepare_lowered_timing)
from fxquant.errors import FxquantError
from fxquant.lower.codebook import CodebookQuantize
from fxquant.lower.subset import SubsetQuantize
from fxquant.passes.lower import LowerPass


def lowered_pair(fake, example: torch.Tensor, planes: int, subset_codes: str) -> dict:
    """The compiled lowered copy with the search, and one whose codes modules are set to the
    table's gather (``compiled_codes``) before its first call compiles it."""
    options = lowered_timing_options(fake, planes, subset_codes)
    searched = fxquant.lowered_copy(fake, **options)
    gathered = fxquant.lowered_copy(fake, **options)
    codes = [m for m in gathered.modules() if isinstance(m, (SubsetQuantize, CodebookQuantize))]
    if not any(m.compiled_codes == "search" for m in codes):
        raise FxquantError("the lowered model has no codes module that searches (DFSQ's or "
                           "I²NQ's codes of up to 32 levels): nothing to compare")
    for module in codes:
        module.compiled_codes = "table"
    with torch.inference_mode():
        searched(example)
        gathered(example)
    return {"lowered, search": searched, "lowered, table": gathered}


def ratios(times: dict[str, list[float]], slow: str, fast: str) -> str:
    per_round = [a / b for a, b in zip(times[slow], times[fast])]
    return f"{statistics.median(per_round):.2f}× ({min(per_round):.2f}–{max(per_round):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_lowered_timing_args(parser, rounds=9)
    args = parser.parse_args(argv)
    zoo, example = prepare_lowered_timing(args)
    float_model = deepcopy(zoo.float_model).eval()
    fp32 = (lambda x: float_model(x, args.scale)) if zoo.spec.takes_scale else float_model
    models = {"fp32 eager": fp32, "fake-quant": zoo.quant_model,
              **lowered_pair(zoo.quant_model, example, args.planes, args.subset_codes)}
    with torch.inference_mode():
        same = torch.equal(models["lowered, search"](example), models["lowered, table"](example))
    options = lowered_timing_options(zoo.quant_model, args.planes, args.subset_codes)
    lowered = LowerPass(**options).spec()
    times = interleaved({k: (lambda m=m: m(example)) for k, m in models.items()}, args.rounds)
    print(f"{args.model} ×{args.scale} `{args.recipe}`, 1×{zoo.spec.channels}×{args.size}² "
          f"input, {cpu_description()}, torch threads {torch.get_num_threads()}, "
          f"{heap_description()}, {args.rounds} interleaved rounds; {lowered}; search and "
          f"table give the same output bit for bit: {same}\n")
    print("| variant | median ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.1f} |")
    print(f"\nsearch over table: {ratios(times, 'lowered, table', 'lowered, search')}; "
          f"search over fake-quant: {ratios(times, 'fake-quant', 'lowered, search')}; "
          f"search over FP32 eager: {ratios(times, 'fp32 eager', 'lowered, search')}")
    return 0 if same else 1


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
