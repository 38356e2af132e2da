"""Nearest-level codes by a branch-free binary search, for the compiled (Inductor) codes
kernels of the lowered non-uniform quantizers: DFSQ's subset points
(fxquant/lower/subset.py) and I²NQ's levels on a uint8 grid (fxquant/lower/codebook.py).

Their eager forwards look each value's code up in a table (fxquant/quant/table_lookup.py).
Under ``lower{compile=true}`` that gather is a data-dependent load, which Inductor runs one
element at a time; the search below is elementwise, so Inductor fuses it into one vectorized
kernel with whatever computes the value. Compare ``j`` tests the midpoint that the ``j``
compares before it select (``torch.where`` over the candidates, one value per row), and the
``b`` outcomes select the code: ``b`` compares and ``2^(b+1) − b − 2`` selects per value (4
and 26 at 16 levels). The selects grow as 2^(b+1) and the gather does not, so the search
pays up to :data:`THRESHOLD_BITS` (``tools/dfsq_codes_timing.py --bits B``,
docs/performance.md, "The compiled codes without the gather").
"""

from __future__ import annotations

import functools

import torch

THRESHOLD_BITS = 5  # up to 32 levels; from 64 the table's gather is faster


@functools.cache
def float_lanes() -> int:
    """float32 values per vector in Inductor's C++ kernels on this CPU (16 with AVX-512, 8
    with AVX2; 0 where it emits no vector code)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return isa.nelements(torch.float32) if isa else 0


def search_vectorizes(channels: int, lanes: int) -> bool:
    """Whether Inductor runs the search over NHWC maps of ``channels`` channels in whole
    vectors of ``lanes`` floats (:func:`float_lanes`, read by the codes modules when built:
    Dynamo would trace into its cache). It vectorizes along the channels (each midpoint row is
    one vector load), and a kernel made mostly of masks, as the search is, gets no vector
    tail: the channels past the last whole vector run one value at a time, each value a few
    dozen scalar loads and selects. PAN's 20-, 24- and 40-channel maps ran its lowered
    `i2nq-w4a4` model 2× slower with the search than with the gather
    (tools/codes_search_ab.py; docs/performance.md), so such maps keep the gather."""
    return lanes > 0 and channels % lanes == 0


class SearchedCodes:
    """What a codes module (DFSQ's, I²NQ's) compiles under ``lower{compile=true}``:
    :attr:`compiled_codes` is ``search`` up to :data:`THRESHOLD_BITS`, else ``table`` (set
    it to ``table`` to time the gather, tools/codes_search_ab.py); a map searches when its
    channels also fill whole vectors (:func:`search_vectorizes`, with the lanes read here,
    when the module is built)."""

    def choose_compiled_codes(self, bits: int) -> None:
        self.compiled_codes = "search" if bits <= THRESHOLD_BITS else "table"
        self.float_lanes = float_lanes()

    def searches(self, channels: int) -> bool:
        """Whether this call, over a map of ``channels`` channels, runs the search."""
        return torch.compiler.is_compiling() and self.compiled_codes == "search" \
            and search_vectorizes(channels, self.float_lanes)


def codes_by_search(values: torch.Tensor, mids: torch.Tensor, codes: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """The code of the interval of sorted ``mids`` that each of ``values`` (``N × C × ...``)
    falls in: ``codes[k]`` for ``mids[k−1] < v <= mids[k]``, that is the count of midpoints
    strictly below ``v`` (ties go to the lower level, as the tables'). ``mids``: ``2^bits − 1``
    rows, ``codes``: ``2^bits`` rows, each row one value per channel (``C``, or 1 for all
    channels); a row is then one contiguous vector load along NHWC's channels. Pad a row
    set with fewer levels by midpoints above every value."""
    if mids.shape[0] != 2 ** bits - 1 or codes.shape[0] != 2 ** bits:
        raise ValueError(f"{bits}-bit search takes {2 ** bits - 1} midpoint rows and "
                         f"{2 ** bits} code rows, got {mids.shape[0]} and {codes.shape[0]}")
    view = (1, mids.shape[1]) + (1,) * (values.ndim - 2)
    outcomes: list[torch.Tensor] = []  # most significant first
    for level in range(bits):
        half = 2 ** (bits - level - 1)  # midpoint p·2·half + half − 1 splits prefix p
        candidates = [mids[p * 2 * half + half - 1].view(view) for p in range(2 ** level)]
        outcomes.append(values > _select(candidates, outcomes))
    return _select([c.view(view) for c in codes], outcomes)


def _select(values: list[torch.Tensor], outcomes: list[torch.Tensor]) -> torch.Tensor:
    """``values[i]`` where ``i``'s bits, most significant first, are ``outcomes``."""
    if not outcomes:
        return values[0]
    half = len(values) // 2
    return torch.where(outcomes[0], _select(values[half:], outcomes[1:]),
                       _select(values[:half], outcomes[1:]))
