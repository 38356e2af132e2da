"""Choosing each channel's 2^b quantization points from the universal set.

Two strategies, as in the DFSQ paper:

* :func:`kmeans_select` (fast, the paper's method): K-means with ``k = 2^b`` on the channel's
  normalized calibration values, one centre pinned at 0 (as the official ``utils/kmeans.py``),
  every centre snapped to its nearest universal value, collisions resolved so the channel gets
  2^b distinct points, best of ``restarts`` runs by quantization squared error.
* :func:`~fxquant.quant.exhaustive_selection.exhaustive_select` (the baseline the paper
  claims to beat, in its own module): every k-subset of the universal set, exact squared
  error of each; exponential in the set size.

All squared errors are computed exactly from sorted samples and prefix sums
(:class:`SortedSamples`): for sorted points the data assigned to point j is a contiguous run of
the sorted samples, cut at the midpoints, so the error of any point set costs O(k log n) and
is vectorized over channels, restarts and candidate sets.

K-means is 1-D, so Lloyd iterations are done the same exact way (the assignment step is a
``searchsorted`` of the midpoints, the update step a difference of prefix sums), vectorized over
channels and restarts. Initialisation (``init``):

* ``"k-means++"`` (default): greedy k-means++ (D² sampling with ``2 + ⌊ln k⌋`` local trials,
  the algorithm of ``sklearn.cluster.kmeans_plusplus``) where the pinned 0 is the first centre,
  run on a 512-point weighted quantile summary of the channel, vectorized over channels and
  restarts;
* ``"sklearn"``: ``sklearn.cluster.kmeans_plusplus`` itself for the free centres, one call
  per (channel, restart) on the same summary, spread over a thread pool (slower: ~2 ms a call);
* ``"random"``: the official init, k − 1 random calibration values plus 0.

With ``pin_zero=False`` no centre is pinned (plain Lloyd; ``init="sklearn"`` then runs
``sklearn.cluster.KMeans`` per channel). Everything is seeded.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

INITS = ("k-means++", "sklearn", "random")
SUMMARY_POINTS = 512
INIT_SUMMARY_POINTS = 256


# ----------------------------------------------------------------------------- exact errors
class SortedSamples:
    """Per-channel sorted samples (``C × n``) with prefix sums, for exact squared errors."""

    def __init__(self, samples: torch.Tensor):
        if samples.ndim == 1:
            samples = samples[None]
        if samples.ndim != 2 or samples.shape[1] == 0:
            raise ValueError(f"samples must be C×n with n > 0, got {tuple(samples.shape)}")
        self.xs = samples.detach().float().sort(dim=1).values.double().contiguous()
        zeros = torch.zeros(self.xs.shape[0], 1, dtype=torch.float64)
        self.s1 = torch.cat([zeros, self.xs.cumsum(1)], 1)
        self.s2 = torch.cat([zeros, (self.xs * self.xs).cumsum(1)], 1)

    def rows(self, index: torch.Tensor) -> "SortedSamples":
        """The same samples for a subset of channels."""
        out = SortedSamples.__new__(SortedSamples)
        out.xs, out.s1, out.s2 = self.xs[index], self.s1[index], self.s2[index]
        return out

    @property
    def channels(self) -> int:
        return self.xs.shape[0]

    @property
    def n(self) -> int:
        return self.xs.shape[1]

    def positions(self, cuts: torch.Tensor) -> torch.Tensor:
        """Number of samples ``< cut`` of each channel; ``cuts`` is ``C × ...``."""
        shape = cuts.shape
        flat = cuts.reshape(shape[0], -1).double().contiguous()
        return torch.searchsorted(self.xs, flat).reshape(shape)

    def run_cost(self, lo: torch.Tensor, hi: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """Σ (x − point)² over sorted samples ``lo..hi-1`` (index tensors ``C × ...``)."""
        shape = lo.shape
        lo2, hi2 = lo.reshape(shape[0], -1), hi.reshape(shape[0], -1)
        count = (hi2 - lo2).double()
        s1 = self.s1.gather(1, hi2) - self.s1.gather(1, lo2)
        s2 = self.s2.gather(1, hi2) - self.s2.gather(1, lo2)
        p = point.reshape(shape[0], -1).double()
        return (s2 - 2.0 * p * s1 + p * p * count).clamp_min(0.0).reshape(shape)

    def sse(self, points: torch.Tensor) -> torch.Tensor:
        """Squared error of nearest-point quantization; ``points`` is ``C × ... × K``, sorted
        along the last dim. Returns ``C × ...``."""
        points = points.double()
        k = points.shape[-1]
        mids = (points[..., 1:] + points[..., :-1]) / 2
        pos = self.positions(mids)
        lead = points.shape[:-1]
        zero = torch.zeros(*lead, 1, dtype=torch.int64)
        full = torch.full((*lead, 1), self.n, dtype=torch.int64)
        bounds = torch.cat([zero, pos, full], -1)
        return self.run_cost(bounds[..., :-1], bounds[..., 1:], points).sum(-1) if k else None

    def summary(self, m: int = SUMMARY_POINTS) -> tuple[torch.Tensor, torch.Tensor]:
        """``m`` weighted points (means of equal-count runs of the sorted samples), ``C × m``."""
        m = min(m, self.n)
        edges = torch.linspace(0, self.n, m + 1).round().long()
        lo, hi = edges[:-1].expand(self.channels, m), edges[1:].expand(self.channels, m)
        count = (hi - lo).double()
        sums = self.s1.gather(1, hi) - self.s1.gather(1, lo)
        return sums / count, count


def nearest_universal(values: torch.Tensor, universe: torch.Tensor) -> torch.Tensor:
    """Index of the universal value nearest to each value (ties to the lower one)."""
    u = universe.double()
    mids = (u[1:] + u[:-1]) / 2
    return torch.searchsorted(mids, values.double().contiguous())


# ----------------------------------------------------------------------------- k-means
def _kmeanspp_torch(points: torch.Tensor, weights: torch.Tensor, k_free: int, pin_zero: bool,
                    gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ on weighted 1-D points ``B × m`` → ``B × k_free`` centres.

    With ``pin_zero`` the distances start from the pinned centre 0 (it is the first centre);
    otherwise the first centre is drawn by weight, as in sklearn.
    """
    b, m = points.shape
    trials = 2 + int(math.log(k_free + int(pin_zero)))
    rows = torch.arange(b)
    centres = torch.empty(b, k_free, dtype=torch.float64)
    if pin_zero:
        d2 = points * points
        start = 0
    else:
        first = torch.multinomial(weights, 1, generator=gen)[:, 0]
        centres[:, 0] = points[rows, first]
        d2 = (points - centres[:, :1]) ** 2
        start = 1
    for j in range(start, k_free):
        prob = weights * d2
        total = prob.sum(1, keepdim=True)
        prob = torch.where(total > 0, prob, weights)  # all points on centres: draw by weight
        cand = torch.multinomial(prob, trials, replacement=True, generator=gen)  # B × T
        cval = points[rows[:, None], cand]
        new_d2 = torch.minimum(d2[:, None, :], (points[:, None, :] - cval[..., None]) ** 2)
        pot = (new_d2 * weights[:, None, :]).sum(-1)  # B × T
        best = pot.argmin(1)
        centres[:, j] = cval[rows, best]
        d2 = new_d2[rows, best]
    return centres


def _kmeanspp_sklearn(points: np.ndarray, weights: np.ndarray, k_free: int, seeds: list[int],
                      workers: int) -> np.ndarray:
    from sklearn.cluster import kmeans_plusplus

    def one(i: int) -> np.ndarray:
        centres, _ = kmeans_plusplus(points[i][:, None], k_free, sample_weight=weights[i],
                                     random_state=seeds[i])
        return centres[:, 0]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return np.stack(list(pool.map(one, range(points.shape[0]))))


def _init_centres(data: SortedSamples, k: int, restarts: int, init: str, pin_zero: bool,
                  gen: torch.Generator, seed: int, workers: int) -> torch.Tensor:
    c, n = data.channels, data.n
    k_free = k - 1 if pin_zero else k
    if k_free == 0:
        return torch.zeros(c, restarts, k, dtype=torch.float64)
    if init == "random":  # k-1 random calibration values (distinct positions when possible)
        if k_free <= n:
            draw = torch.rand(c * restarts, n, generator=gen).topk(k_free, 1).indices
        else:
            draw = torch.randint(0, n, (c * restarts, k_free), generator=gen)
        free = data.xs.repeat_interleave(restarts, 0).gather(1, draw)
    else:
        pts, wts = data.summary(INIT_SUMMARY_POINTS)
        pts = pts.repeat_interleave(restarts, 0)
        wts = wts.repeat_interleave(restarts, 0)
        if init == "sklearn":
            seeds = [seed * 1_000_003 + i for i in range(pts.shape[0])]
            free = torch.from_numpy(_kmeanspp_sklearn(pts.numpy(), wts.numpy(), k_free, seeds,
                                                      workers))
        else:
            free = _kmeanspp_torch(pts, wts, k_free, pin_zero, gen)
    free = free.reshape(c, restarts, k_free).double()
    if pin_zero:
        free = torch.cat([free, torch.zeros(c, restarts, 1, dtype=torch.float64)], -1)
    return free


def lloyd_1d(data: SortedSamples, centres: torch.Tensor, *, iters: int = 100, tol: float = 1e-3,
             pin_zero: bool = True, gen: torch.Generator | None = None) -> torch.Tensor:
    """Exact 1-D Lloyd iterations on ``centres`` (``C × R × k``; with ``pin_zero`` the last
    centre of each run is the pinned one and stays at 0). Returns the centres sorted.

    Stops a run when no centre moves by ``tol`` or more (official: ``max|Δ| < 1e-3``) or after
    ``iters`` iterations; an empty cluster is reseeded to a random sample (as upstream). In
    1-D the update keeps sorted centres sorted (each mean lies inside its own run of samples),
    so centres are re-sorted only after a reseed.
    """
    c, r, k = centres.shape
    centres, order = centres.double().sort(-1)
    pinned = (order == k - 1) if pin_zero else torch.zeros_like(order, dtype=torch.bool)
    active = torch.ones(c, r, dtype=torch.bool)
    zero = torch.zeros(c, r, 1, dtype=torch.int64)
    full = torch.full((c, r, 1), data.n, dtype=torch.int64)
    for _ in range(iters):
        mids = (centres[..., 1:] + centres[..., :-1]) / 2
        bounds = torch.cat([zero, data.positions(mids), full], -1)
        lo, hi = bounds[..., :-1], bounds[..., 1:]
        count = (hi - lo).double()
        sums = (data.s1.gather(1, hi.reshape(c, -1)) -
                data.s1.gather(1, lo.reshape(c, -1))).reshape(c, r, k)
        new = sums / count.clamp_min(1.0)
        empty = (count == 0) & ~pinned & active[..., None]
        if pin_zero:
            new = new.masked_fill(pinned, 0.0)
        new = torch.where(active[..., None], new, centres)
        reseeded = bool(empty.any())
        if reseeded:
            draw = torch.randint(0, data.n, (c, r * k), generator=gen)
            new = torch.where(empty, data.xs.gather(1, draw).reshape(c, r, k), new)
        moved = (new - centres).abs().amax(-1)
        centres = new
        if reseeded:
            centres, order = centres.sort(-1)
            pinned = pinned.gather(-1, order)
        active &= moved >= tol
        if not active.any():
            break
    return centres


def resolve_collisions(data: SortedSamples, used: torch.Tensor, universe: torch.Tensor,
                       k: int) -> torch.Tensor:
    """Grow each row's set of used universal values (``used``: ``C × R × |U|`` bool) to exactly
    ``k`` distinct values, greedily adding the unused value that lowers the squared error most
    (ties: the one nearest 0). Rows already holding k values are unchanged.

    Adding value v between its used neighbours a < v < b only moves the samples in
    [(a+v)/2, (v+b)/2) to v, so each candidate's error change is exact from prefix sums. Every
    cut is a midpoint of two universal values; their sample positions are looked up once
    (official set: at most 4097 distinct midpoints), so each step is a few gathers.
    """
    c, r, size = used.shape
    if k > size:
        raise ValueError(f"{k} points requested from a universal set of {size} values")
    used = used.clone()
    short = (used.sum(-1) < k).any(-1).nonzero()[:, 0]
    if short.numel() == 0:
        return used
    if short.numel() < c:  # work only on the channels that need it
        used[short] = resolve_collisions(data.rows(short), used[short], universe, k)
        return used
    u = universe.double()
    pair_mid = (u[:, None] + u[None, :]) / 2
    mids, pair_index = torch.unique(pair_mid, return_inverse=True)  # sorted distinct cuts
    cut_pos = data.positions(mids.expand(c, -1))  # C × |mids|

    def pos(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        flat = pair_index[i, j].reshape(c, -1)
        return cut_pos.gather(1, flat).reshape(i.shape)

    ar = torch.arange(size)
    v_idx = ar.expand(c, r, size)
    v = u.expand(c, r, size)
    while True:
        need = used.sum(-1) < k
        if not need.any():
            return used
        # nearest used neighbours below/above each value
        below = torch.where(used, ar, torch.full_like(ar, -1)).cummax(-1).values
        above = torch.where(used, ar, torch.full_like(ar, size)).flip(-1).cummin(-1).values.flip(-1)
        has_a, has_b = below >= 0, above < size
        a_idx, b_idx = below.clamp(0, size - 1), above.clamp(0, size - 1)
        pa, pb = u[a_idx], u[b_idx]
        lo = torch.where(has_a, pos(a_idx, v_idx), torch.zeros_like(below))
        hi = torch.where(has_b, pos(v_idx, b_idx), torch.full_like(above, data.n))
        split = torch.where(has_a & has_b, pos(a_idx, b_idx), torch.where(has_a, hi, lo))
        split = torch.minimum(torch.maximum(split, lo), hi)
        old = torch.where(has_a, data.run_cost(lo, split, pa), torch.zeros_like(v)) + \
            torch.where(has_b, data.run_cost(split, hi, pb), torch.zeros_like(v))
        delta = data.run_cost(lo, hi, v) - old
        delta = torch.where(used, torch.full_like(delta, math.inf), delta)
        best_delta = delta.amin(-1, keepdim=True)
        tol = 1e-12 * (1.0 + best_delta.abs())
        tie = torch.where(delta <= best_delta + tol, v.abs(), torch.full_like(v, math.inf))
        pick = tie.argmin(-1)
        add = torch.zeros_like(used).scatter_(-1, pick[..., None], True) & need[..., None]
        used |= add


@dataclass
class Selection:
    """Per-channel points (``C × k``, sorted, distinct, universal) and their squared error."""

    points: torch.Tensor
    sse: torch.Tensor  # per channel, summed over samples
    samples: int
    collisions: int = 0  # channels (of the best restarts) that needed collision resolution
    evaluated: int = 0  # exhaustive: subsets evaluated per channel
    complete: bool = True

    @property
    def mse(self) -> torch.Tensor:
        return self.sse / max(self.samples, 1)


def kmeans_select(samples: torch.Tensor, universe: torch.Tensor, k: int, *, restarts: int = 5,
                  iters: int = 100, tol: float = 1e-3, init: str = "k-means++",
                  pin_zero: bool = True, seed: int = 0, workers: int = 2) -> Selection:
    """DFSQ's fast selection for every channel of ``samples`` (``C × n``) at once."""
    if init not in INITS:
        raise ValueError(f"unknown K-means init '{init}'; choose one of {', '.join(INITS)}")
    if k > universe.numel():
        raise ValueError(f"{k} points requested from a universal set of {universe.numel()} values")
    if pin_zero and not bool((universe == 0).any()):
        raise ValueError("pin_zero needs 0 in the universal set")
    data = SortedSamples(samples)
    c = data.channels
    gen = torch.Generator().manual_seed(seed)
    if not pin_zero and init == "sklearn":
        centres = _sklearn_kmeans(data, k, restarts, iters, tol, seed, workers)
    else:
        centres = _init_centres(data, k, restarts, init, pin_zero, gen, seed, workers)
        centres = lloyd_1d(data, centres, iters=iters, tol=tol, pin_zero=pin_zero, gen=gen)
    # Snap; pick the restart with the lowest quantization error of its snapped points
    # (duplicates do not change the error: the official quant_loss), then give the winner
    # 2^b distinct points (adding a point never raises the error).
    idx = nearest_universal(centres, universe)  # C × R × k
    snapped = universe.double()[idx].sort(-1).values
    best = data.sse(snapped).argmin(1)
    rows = torch.arange(c)
    used = torch.zeros(c, 1, universe.numel(), dtype=torch.bool)
    used.scatter_(-1, idx[rows, best][:, None], True)
    collided = int((used.sum(-1) < k).sum())
    used = resolve_collisions(data, used, universe, k)
    points = universe.double().expand(c, 1, -1)[used].reshape(c, k)
    return Selection(points.to(universe.dtype), data.sse(points), data.n, collided)


def _sklearn_kmeans(data: SortedSamples, k: int, restarts: int, iters: int, tol: float,
                    seed: int, workers: int) -> torch.Tensor:
    """Unpinned variant: ``sklearn.cluster.KMeans`` (Lloyd, k-means++) on each channel's
    weighted summary, one fit per (channel, restart)."""
    from sklearn.cluster import KMeans

    pts, wts = data.summary()

    def one(job: tuple[int, int]) -> np.ndarray:
        ch, rs = job
        km = KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd",
                    random_state=seed * 1_000_003 + ch * restarts + rs)
        km.fit(pts[ch].numpy()[:, None], sample_weight=wts[ch].numpy())
        return km.cluster_centers_[:, 0]

    jobs = [(ch, rs) for ch in range(data.channels) for rs in range(restarts)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        out = np.stack(list(pool.map(one, jobs)))
    centres = torch.from_numpy(out).reshape(data.channels, restarts, k)
    return lloyd_1d(data, centres, iters=iters, tol=tol, pin_zero=False)
