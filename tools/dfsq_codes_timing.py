"""The compiled DFSQ codes of one layer three ways: the grid table's gather (what Inductor ran
before the search), the branch-free search of the midpoints ``lower{compile=true}`` runs up
to :data:`fxquant.lower.search.THRESHOLD_BITS` (``SubsetQuantize.codes_by_thresholds``), and
the same with the codes re-gridded to one byte (``lower{subset_codes=u8}``); beside them the
normalization alone (rounded to a byte, no nearest point), the floor any codes kernel pays.
The input: a 1×64×S×S NHWC map, signed (mean-shifted) dynamic DFSQ with 2^bits random points
per channel (default 16) from the official universal set (four words, 377 values). Checks
that the table and the search give the same codes, then interleaved rounds (default 15), 2
threads, freed blocks kept on the heap (fxquant/heap.py, as ``fxquant bench``), medians.
``--bits`` shows where the search stops paying. ``--pieces K`` times instead the one-byte
codes of a channel concat of K such maps (IMDN's last fusion conv reads six): the concat
coded whole, as the ``lower`` pass left it before ``dynamic_cat_pieces``, against piece by
piece, as it does now (passes/lower_rewrites.py).

    python tools/dfsq_codes_timing.py [S] [ROUNDS] [--bits B] [--pieces K]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fxquant.bench import interleaved
from fxquant.cli_args import positive_int
from fxquant.bench_table import heap_description
from fxquant.heap import keep_freed_blocks
from fxquant.lower.subset import SubsetQuantize
from fxquant.quant.subset import SubsetQuantizer, grid_lookup, subset_normalize
from fxquant.quant.universal_set import universal_set

CHANNELS = 64


def codes_modules(seed: int = 0, bits: int = 4, channels: int = CHANNELS
                  ) -> dict[str, SubsetQuantize]:
    """NHWC codes modules, exact and one-byte, of one random official-set quantizer."""
    g = torch.Generator().manual_seed(seed)
    official = universal_set(4, [], True)
    q = SubsetQuantizer(bits, channels, post_relu=False, mode="dynamic")
    q.set_points(torch.stack([official[torch.randperm(len(official), generator=g)[:2 ** bits]]
                              for _ in range(channels)]))
    return {codes: SubsetQuantize.from_quantizer(q, True, codes=codes) for codes in ("exact", "u8")}


def normalized(module: SubsetQuantize, x: torch.Tensor) -> torch.Tensor:
    return subset_normalize(x, "dynamic", False, module.eps, multiplier=module.step_multiplier)[0]


def forms(modules: dict[str, SubsetQuantize]) -> dict:
    exact, u8 = modules["exact"], modules["u8"]
    return {
        "grid table (gather)": lambda x: grid_lookup(normalized(exact, x), exact.lookup_exponent,
                                                     exact.table),
        "search": lambda x: exact.codes_by_thresholds(normalized(exact, x)),
        "search, one-byte codes": lambda x: u8.codes_by_thresholds(normalized(u8, x)),
        "normalization alone": lambda x: (normalized(exact, x) * 127 + 128).round()
        .clamp(0, 255).to(torch.uint8),
    }


def concat_forms(pieces: int, bits: int = 4) -> dict:
    """The one-byte codes module of ``pieces`` × 64 channels, given the concat or its pieces."""
    module = codes_modules(bits=bits, channels=CHANNELS * pieces)["u8"]
    return {"concat, coded whole": lambda maps: module(torch.cat(maps, 1)),
            "concat, coded piece by piece": lambda maps: module(list(maps))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="?", type=positive_int, default=256,
                        help="the map's height and width (default 256)")
    parser.add_argument("rounds", nargs="?", type=positive_int, default=15)
    parser.add_argument("--bits", type=int, choices=range(2, 9), default=4,
                        help="points per channel 2^bits (default 4: 16 points)")
    parser.add_argument("--pieces", type=positive_int, default=1,
                        help="K ≥ 2: time the codes of a concat of K maps, whole and piece by "
                             "piece (default 1: the four forms of one map)")
    args = parser.parse_args(argv)
    size, rounds = args.size, args.rounds
    torch.set_num_threads(2)
    keep_freed_blocks()  # as fxquant bench: no page faults from fresh output buffers per call
    torch.manual_seed(0)
    maps = [torch.randn(1, CHANNELS, size, size).contiguous(memory_format=torch.channels_last)
            for _ in range(args.pieces)]
    x = maps[0] if args.pieces == 1 else maps
    if args.pieces == 1:
        compiled = {name: torch.compile(f)
                    for name, f in forms(codes_modules(bits=args.bits)).items()}
        first, second, what = "grid table (gather)", "search", "table and search"
    else:
        compiled = {name: torch.compile(f) for name, f in concat_forms(args.pieces, args.bits).items()}
        first, second, what = "concat, coded whole", "concat, coded piece by piece", \
            "whole and piece by piece"
    with torch.inference_mode():
        a, b = compiled[first](x), compiled[second](x)
        same = torch.equal(a[0], b[0]) if isinstance(a, tuple) else torch.equal(a, b)
        times = interleaved({k: (lambda f=f: f(x)) for k, f in compiled.items()}, rounds)
    shape = f"1×{CHANNELS}×{size}²" if args.pieces == 1 else \
        f"{args.pieces} maps 1×{CHANNELS}×{size}² concatenated"
    print(f"DFSQ codes, {shape} NHWC, official set, {2 ** args.bits} points per channel, "
          f"compiled, torch threads 2, {heap_description()}, {rounds} interleaved rounds; "
          f"{what} give the same codes: {same}\n")
    print("| form | median ms |\n|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * statistics.median(t):.2f} |")
    return 0 if same else 1


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
