"""DFSQ subset quantizer: nearest-point lookup, membership, normalization, STE, sampling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant.channel_norm import EPS, denormalize
from fxquant.quant.point_selection import kmeans_select
from fxquant.quant.subset import (
    SampleObserver,
    SubsetQuantizer,
    grid_exponent,
    grid_index,
    grid_lookup,
    grid_table,
    nearest_index,
    nearest_point,
    subset_normalize,
)
from fxquant.quant.universal_set import universal_set

U = universal_set()


def random_points(g: torch.Generator, channels: int, k: int) -> torch.Tensor:
    """``channels × k`` sorted distinct universal values."""
    return torch.stack([U[torch.randperm(U.numel(), generator=g)[:k]].sort().values
                        for _ in range(channels)])


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 6), st.sampled_from([2, 4, 8, 16]),
       st.floats(0.1, 3.0))
def test_nearest_point_is_optimal_and_in_the_channel_set(seed, n, c, k, spread):
    g = torch.Generator().manual_seed(seed)
    points = random_points(g, c, k)
    x = torch.randn(n, c, 5, 3, generator=g) * spread
    q = nearest_point(x, points)
    # brute force: distance to every point of the channel
    dist = (x.unsqueeze(-1) - points.view(1, c, 1, 1, k)).abs()
    best = dist.min(-1).values
    assert torch.allclose((x - q).abs(), best, atol=1e-6)
    member = (q.unsqueeze(-1) == points.view(1, c, 1, 1, k)).any(-1)
    assert member.all()
    assert torch.isin(q, U).all()
    idx = nearest_index(x, points)
    assert torch.equal(q.reshape(n, c, -1), points.expand(n, c, k).gather(2, idx))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.booleans(), st.floats(0.01, 100.0))
def test_normalization_round_trips_and_ranges(seed, post_relu, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, 6, generator=g) * spread + spread
    if post_relu:
        x = x.clamp_min(0)
    xn, scale, mean = subset_normalize(x, "dynamic", post_relu, EPS)
    assert torch.allclose(denormalize(xn, scale, mean), x, rtol=1e-5, atol=1e-5 * spread)
    assert xn.abs().max() <= 1.0
    if post_relu:
        assert mean is None and (xn >= 0).all()
        assert torch.allclose(scale.flatten(), x.abs().amax((2, 3)).flatten() + EPS)
    else:
        centred = x - x.mean((2, 3), keepdim=True)
        assert torch.allclose(scale.flatten(), centred.abs().amax((2, 3)).flatten() + EPS)


def test_dynamic_quantizer_matches_the_official_formula():
    g = torch.Generator().manual_seed(0)
    q = SubsetQuantizer(3, 4, post_relu=False)
    q.set_points(random_points(g, 4, 8))
    x = torch.randn(2, 4, 7, 7, generator=g) * 3 + 1
    mu = x.mean((2, 3), keepdim=True)
    m = (x - mu).abs().amax((2, 3), keepdim=True)
    xt = (x - mu) / (m + 1e-8)
    ref = torch.empty_like(xt)
    for c in range(4):  # the official brute-force argmin, per channel
        p = q.points[c]
        ref[:, c] = p[(xt[:, c].unsqueeze(-1) - p).abs().argmin(-1)]
    assert torch.allclose(q(x), ref * (m + 1e-8) + mu, atol=1e-6)


def test_post_relu_quantized_values_are_universal_points():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 5, 5, generator=g)
    xn, _, _ = subset_normalize(x, "dynamic", True, EPS)
    sel = kmeans_select(xn.transpose(0, 1).reshape(2, -1), U, 4, restarts=2, iters=10)
    q = SubsetQuantizer(2, 2, post_relu=True)
    q.set_points(sel.points)
    out = q.quantize_normalized(xn)
    assert torch.isin(out, U).all()
    assert (out.unsqueeze(-1) == q.points.view(1, 2, 1, 1, 4)).any(-1).all()


def test_straight_through_gradient():
    q = SubsetQuantizer(2, 3)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))  # statistics are detached, rounding is STE


def test_static_mode_scales_and_identity_when_disabled():
    q = SubsetQuantizer(4, 3, mode="static")
    q.set_scale(torch.tensor([2.0, 4.0, 0.5]))
    x = torch.randn(2, 3, 4, 4)
    q.quant_mode = "off"
    assert torch.allclose(q(x), x, rtol=1e-6)
    q.quant_mode = "fake-quant"
    xn = x * torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    expected = nearest_point(xn, q.points) * torch.tensor([2.0, 4.0, 0.5]).view(1, 3, 1, 1)
    assert torch.allclose(q(x), expected)
    assert q.describe()["mode"] == "static" and q.describe()["folded"] == "none"


def test_describe_and_check():
    q = SubsetQuantizer(4, 8, post_relu=True)
    d = q.describe()
    assert d == {"kind": "subset", "bits": 4, "points": 16, "mode": "dynamic",
                 "granularity": "per-channel points, per-image-channel norm", "post_relu": True}
    q.check()
    with torch.no_grad():
        q.points[0, 1] = q.points[0, 0]
    with pytest.raises(ValueError, match="sorted and distinct"):
        q.check()
    with torch.no_grad():
        q.points[0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        q.check()
    with pytest.raises(ValueError, match="choose one of"):
        SubsetQuantizer(4, 8, mode="nope")


def test_state_dict_round_trip():
    g = torch.Generator().manual_seed(2)
    a = SubsetQuantizer(3, 5, mode="static")
    a.set_points(random_points(g, 5, 8))
    a.set_scale(torch.rand(5) + 0.5)
    b = SubsetQuantizer(3, 5, mode="static")
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 3, 3)
    assert torch.equal(a(x), b(x))


def test_observer_samples_uniformly_within_its_cap():
    obs = SampleObserver("n", 2, max_samples=100, seed=0)
    x = torch.randn(4, 2, 10, 10)
    for batch in x.split(1):
        assert torch.equal(obs(batch), batch)
    samples = obs.normalized_samples()
    assert samples.shape == (2, 100) and obs.seen == 400
    allowed = subset_normalize(x, "dynamic", False, EPS)[0].transpose(0, 1).reshape(2, -1)
    for c in range(2):
        assert torch.isin(samples[c], allowed[c]).all()
    again = SampleObserver("n", 2, max_samples=100, seed=0)
    for batch in x.split(2):
        again(batch)
    assert again.normalized_samples().shape == (2, 100)


def test_static_observer_normalizes_by_the_calibration_max():
    obs = SampleObserver("n", 2, mode="static", max_samples=10_000)
    x = torch.randn(3, 2, 4, 4) * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1)
    obs(x)
    assert torch.allclose(obs.scale(), x.abs().amax((0, 2, 3)) + EPS)
    assert obs.normalized_samples().abs().max() <= 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 4, 16, 64]))
def test_grid_table_equals_the_searchsorted_reference_including_ties(seed, k):
    g = torch.Generator().manual_seed(seed)
    points = random_points(g, 3, k)
    mids = (points[:, 1:] + points[:, :-1]) / 2
    x = torch.cat([torch.rand(2, 3, 50, generator=g) * 2.4 - 1.2,  # inside and outside [-1, 1]
                   mids.unsqueeze(0).expand(2, 3, k - 1)], 2)  # exactly on the midpoints
    ref = points.expand(2, 3, k).gather(2, nearest_index(x, points))
    assert grid_exponent(points) is not None
    assert torch.equal(nearest_point(x, points), ref)
    q = SubsetQuantizer(2, 3)
    q.points = points  # any K works for the lookup
    assert torch.equal(q.quantize_normalized(x), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("s, channels", [(11, 3), (16, 300)])  # 300·(2^17 + 1) > 2^24
def test_grid_index_is_the_exact_integer_position_in_memory_order(dtype, s, channels):
    """The float index arithmetic (float32, or float64 where float32 would round) gives the
    integer position of every value, flattened in the input's memory order."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(2, channels, 3, 5, generator=g) * 2.4 - 1.2).to(dtype)
    x[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)  # exactly on grid points
    width = 2 ** (s + 1) + 1
    position = torch.ceil(x.double() * 2 ** s).clamp(-2 ** s, 2 ** s).long() + 2 ** s
    expected = position + torch.arange(channels).view(1, -1, 1, 1) * width
    index = grid_index(x, s, width)
    assert index.dtype == torch.int32
    assert torch.equal(index.long(), expected.reshape(-1))
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(grid_index(nhwc, s, width).long(),
                       expected.permute(0, 2, 3, 1).reshape(-1))


def test_non_dyadic_points_use_the_searchsorted_path():
    points = torch.tensor([[-0.7, 0.1, 1 / 3], [-1 / 3, 0.0, 0.2]])
    assert grid_exponent(points) is None
    x = torch.linspace(-1, 1, 101).view(1, 1, -1).expand(1, 2, -1)
    brute = points.view(1, 2, 1, 3)[..., :].expand(1, 2, 101, 3)
    best = brute.gather(3, (x.unsqueeze(-1) - points.view(1, 2, 1, 3)).abs().argmin(-1, keepdim=True))
    assert torch.allclose(nearest_point(x, points), best[..., 0])


def test_table_cache_follows_point_updates():
    g = torch.Generator().manual_seed(4)
    q = SubsetQuantizer(2, 2)
    x = torch.rand(1, 2, 10, generator=g) * 2 - 1
    first = q.quantize_normalized(x)
    q.set_points(random_points(g, 2, 4))
    assert torch.equal(q.quantize_normalized(x), nearest_point(x, q.points))
    assert not torch.equal(first, q.quantize_normalized(x))


@pytest.mark.parametrize("shape", [(2, 6, 5, 1), (2, 6, 1, 1), (2, 6, 1, 4), (1, 6, 3, 3)])
def test_grid_lookup_is_the_same_in_every_layout(shape):
    """Channels-last inputs with size-1 dims (ambiguous strides) and channel slices look up
    the same points as the contiguous input, in the input's own layout."""
    g = torch.Generator().manual_seed(1)
    points = torch.sort(torch.randint(-1024, 1025, (6, 16), generator=g).float() / 1024,
                        1).values
    table = grid_table(points, 11)
    x = torch.rand(*shape, generator=g) * 2.4 - 1.2
    expected = grid_lookup(x.contiguous(), 11, table)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(grid_lookup(nhwc, 11, table), expected)
    wide = torch.cat([x, x], 1).contiguous(memory_format=torch.channels_last)[:, 6:]
    assert torch.equal(grid_lookup(wide, 11, table), expected)
