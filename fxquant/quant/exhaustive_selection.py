"""Exhaustive point selection, the baseline DFSQ claims to beat: every k-subset of the
universal set (or only those holding 0), scored by exact squared error, per channel.

The exact errors, :class:`SortedSamples` and :class:`Selection` are shared with the K-means
selection in :mod:`fxquant.quant.point_selection`.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch

from fxquant.quant.point_selection import Selection, SortedSamples


def subset_count(size: int, k: int, pin_zero: bool) -> int:
    """How many candidate subsets exhaustive search evaluates per channel."""
    return math.comb(size - 1, k - 1) if pin_zero else math.comb(size, k)


def exhaustive_select(samples: torch.Tensor, universe: torch.Tensor, k: int, *,
                      pin_zero: bool = False, chunk: int = 65536,
                      time_budget: float | None = None, limit: int | None = None) -> Selection:
    """Best k-subset of ``universe`` for each channel by exact squared error.

    ``pin_zero`` restricts the search to subsets holding 0. ``time_budget`` (seconds, per
    channel) stops early: the result then has ``complete=False`` and ``evaluated`` says how many
    subsets were seen (for extrapolation). ``limit`` refuses searches larger than that.
    """
    size = universe.numel()
    if k > size:
        raise ValueError(f"{k} points requested from a universal set of {size} values")
    total = subset_count(size, k, pin_zero)
    if limit is not None and total > limit:
        raise ValueError(f"exhaustive search over C({size - int(pin_zero)}, {k - int(pin_zero)}) = "
                         f"{total:.3g} subsets per channel exceeds the limit {limit:.3g}; use a "
                         "smaller universal set or fewer bits, or selection = 'kmeans'")
    data = SortedSamples(samples)
    u = universe.double()
    zero_idx = int(torch.nonzero(universe == 0)[0, 0]) if pin_zero else -1
    pool = [i for i in range(size) if i != zero_idx]
    free = k - 1 if pin_zero else k
    best_points, best_sse = [], []
    evaluated, complete = 0, True
    for ch in range(data.channels):
        one = _OneChannel(data, ch)
        started = time.perf_counter()
        combos = itertools.combinations(pool, free)
        best = (math.inf, None)
        seen = 0
        while True:
            block = np.fromiter(itertools.chain.from_iterable(itertools.islice(combos, chunk)),
                                dtype=np.int64)
            if block.size == 0 and free > 0:
                break
            idx = torch.from_numpy(block.reshape(-1, free)) if free else torch.zeros(1, 0, dtype=torch.int64)
            if pin_zero:
                idx = torch.cat([idx, torch.full((idx.shape[0], 1), zero_idx)], 1).sort(1).values
            errors = one.sse(u[idx])
            i = int(errors.argmin())
            if float(errors[i]) < best[0]:
                best = (float(errors[i]), u[idx[i]])
            seen += idx.shape[0]
            if free == 0 or (time_budget is not None and time.perf_counter() - started > time_budget):
                complete = complete and seen >= total
                break
        evaluated = seen
        best_sse.append(best[0])
        best_points.append(best[1])
    return Selection(torch.stack(best_points).to(universe.dtype),
                     torch.tensor(best_sse, dtype=torch.float64), data.n, 0, evaluated, complete)


class _OneChannel:
    """SSE of many candidate point sets (``B × k``) for one channel."""

    def __init__(self, data: SortedSamples, ch: int):
        self.xs, self.s1, self.s2, self.n = data.xs[ch], data.s1[ch], data.s2[ch], data.n

    def sse(self, points: torch.Tensor) -> torch.Tensor:
        mids = (points[:, 1:] + points[:, :-1]) / 2
        pos = torch.searchsorted(self.xs, mids.contiguous())
        b = points.shape[0]
        bounds = torch.cat([torch.zeros(b, 1, dtype=torch.int64), pos,
                            torch.full((b, 1), self.n, dtype=torch.int64)], 1)
        lo, hi = bounds[:, :-1], bounds[:, 1:]
        count = (hi - lo).double()
        s1 = self.s1[hi] - self.s1[lo]
        s2 = self.s2[hi] - self.s2[lo]
        return (s2 - 2 * points * s1 + points * points * count).clamp_min(0).sum(1)
