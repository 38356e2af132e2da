"""DFSQ point selection: exact errors, K-means with pinned zero, collision resolution,
exhaustive search."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.exhaustive_selection import exhaustive_select, subset_count
from fxquant.quant.point_selection import (
    SortedSamples,
    kmeans_select,
    lloyd_1d,
    nearest_universal,
    resolve_collisions,
)
from fxquant.quant.universal_set import universal_set

U = universal_set()
U_SMALL = universal_set(2)  # 29 values


def brute_sse(x: torch.Tensor, points: torch.Tensor) -> float:
    d = (x.double()[:, None] - points.double()[None, :]) ** 2
    return float(d.min(1).values.sum())


samples = st.builds(
    lambda seed, n, spread, relu: _draw(seed, n, spread, relu),
    st.integers(0, 10_000), st.integers(1, 300), st.floats(0.01, 1.0), st.booleans())


def _draw(seed, n, spread, relu):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * spread).clamp(-1, 1)
    return x.abs() if relu else x


@settings(max_examples=40, deadline=None)
@given(samples, st.integers(0, 10_000), st.integers(1, 12))
def test_sse_is_exact(x, seed, k):
    g = torch.Generator().manual_seed(seed)
    points = U[torch.randperm(U.numel(), generator=g)[:k]].sort().values
    got = float(SortedSamples(x).sse(points[None])[0])
    assert got == pytest.approx(brute_sse(x, points), rel=1e-9, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(samples, st.sampled_from([2, 4, 8, 16]), st.booleans())
def test_kmeans_gives_distinct_sorted_universal_points(x, k, pin_zero):
    sel = kmeans_select(torch.stack([x, -x]), U, k, restarts=2, iters=20, pin_zero=pin_zero)
    assert sel.points.shape == (2, k)
    assert (sel.points[:, 1:] > sel.points[:, :-1]).all()  # sorted, 2^b distinct values
    assert torch.isin(sel.points, U).all()
    if pin_zero:
        assert (sel.points == 0).any(1).all()
    for ch, data in enumerate((x, -x)):
        assert float(sel.sse[ch]) == pytest.approx(brute_sse(data, sel.points[ch]), rel=1e-9, abs=1e-9)


def test_kmeans_is_deterministic_for_a_seed():
    x = torch.randn(4, 500).clamp(-1, 1)
    a = kmeans_select(x, U, 16, seed=3)
    b = kmeans_select(x, U, 16, seed=3)
    assert torch.equal(a.points, b.points)


@settings(max_examples=30, deadline=None)
@given(samples, st.integers(0, 10_000), st.integers(1, 6), st.integers(0, 4))
def test_collision_resolution_gives_k_distinct_points_and_never_raises_the_error(x, seed, start, extra):
    g = torch.Generator().manual_seed(seed)
    k = start + extra
    used = torch.zeros(1, 1, U_SMALL.numel(), dtype=torch.bool)
    used[0, 0, torch.randperm(U_SMALL.numel(), generator=g)[:start]] = True
    data = SortedSamples(x)
    before = brute_sse(x, U_SMALL[used[0, 0]])
    out = resolve_collisions(data, used, U_SMALL, k)
    assert int(out.sum()) == k
    assert (out | ~used).all()  # only adds
    assert brute_sse(x, U_SMALL[out[0, 0]]) <= before + 1e-9


def test_collision_resolution_picks_the_best_single_addition():
    x = torch.tensor([-0.5, -0.49, 0.3, 0.31, 0.9])
    used = torch.zeros(1, 1, U_SMALL.numel(), dtype=torch.bool)
    used[0, 0, nearest_universal(torch.tensor([0.0]), U_SMALL)] = True
    out = resolve_collisions(SortedSamples(x), used, U_SMALL, 2)
    added = U_SMALL[out[0, 0]]
    best = min((brute_sse(x, torch.tensor(sorted([0.0, float(v)]))), float(v))
               for v in U_SMALL if v != 0)
    assert brute_sse(x, added) == pytest.approx(best[0])


@settings(max_examples=10, deadline=None)
@given(samples, st.sampled_from([2, 3, 4]))
def test_exhaustive_is_never_worse_than_kmeans(x, k):
    ks = kmeans_select(x[None], U_SMALL, k, restarts=2, iters=20)
    ex = exhaustive_select(x[None], U_SMALL, k)
    assert ex.complete and ex.evaluated == subset_count(U_SMALL.numel(), k, False)
    assert float(ex.sse[0]) <= float(ks.sse[0]) + 1e-9


def test_exhaustive_finds_the_brute_force_optimum():
    x = torch.randn(200, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    u = universal_set(1)  # 7 values
    best = min(brute_sse(x, u[list(c)]) for c in itertools.combinations(range(u.numel()), 3))
    got = exhaustive_select(x[None], u, 3, chunk=4)
    assert float(got.sse[0]) == pytest.approx(best)
    pinned = exhaustive_select(x[None], u, 3, pin_zero=True)
    assert (pinned.points == 0).any() and float(pinned.sse[0]) >= best - 1e-12


def test_exhaustive_refuses_huge_searches_and_honours_a_time_budget():
    x = torch.rand(1, 100)
    with pytest.raises(ValueError, match="exceeds the limit"):
        exhaustive_select(x, U, 16, limit=10 ** 6)
    partial = exhaustive_select(x, U, 4, time_budget=0.0, chunk=1000)
    assert not partial.complete and partial.evaluated == 1000


def test_lloyd_matches_sklearn_from_the_same_start():
    from sklearn.cluster import KMeans

    x = torch.randn(1, 3000, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    init = torch.tensor([[-0.9, -0.3, 0.1, 0.4, 0.8]], dtype=torch.float64)
    ours = lloyd_1d(SortedSamples(x), init[:, None, :], iters=300, tol=1e-12, pin_zero=False)
    km = KMeans(5, init=init[0].numpy()[:, None], n_init=1, max_iter=300, tol=0.0,
                algorithm="lloyd").fit(x[0].double().numpy()[:, None])
    np.testing.assert_allclose(np.sort(ours[0, 0].numpy()), np.sort(km.cluster_centers_[:, 0]),
                               atol=1e-9)


def test_pinned_centre_stays_at_zero():
    x = torch.rand(1, 1000) * 0.5 + 0.5  # no data near 0
    centres = lloyd_1d(SortedSamples(x), torch.tensor([[[0.6, 0.9, 0.0]]]), pin_zero=True)
    assert float(centres[0, 0, 0]) == 0.0 and (centres[0, 0, 1:] > 0.5).all()


@pytest.mark.parametrize("init", ["k-means++", "sklearn", "random"])
def test_every_init_gives_a_valid_selection(init):
    x = torch.randn(3, 400, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    sel = kmeans_select(x, U, 8, restarts=2, iters=10, init=init)
    assert sel.points.shape == (3, 8) and torch.isin(sel.points, U).all()


def test_unpinned_sklearn_kmeans():
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    sel = kmeans_select(x, U, 4, restarts=2, iters=10, init="sklearn", pin_zero=False)
    assert sel.points.shape == (2, 4) and (sel.points[:, 1:] > sel.points[:, :-1]).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="choose one of"):
        kmeans_select(torch.rand(1, 10), U, 4, init="nope")
    with pytest.raises(ValueError, match="universal set of 7"):
        kmeans_select(torch.rand(1, 10), universal_set(1), 8)
