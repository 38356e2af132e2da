"""Folding per-channel scales into convs: exact equivalences, including grouped convs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.quant.channel_norm import (
    MAX_REDUCTION_CHUNKS,
    channel_mean,
    dynamic_stats_minmax,
    fold_input_scale,
    fold_output_scale,
    reduction_chunks,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1, 2, 4]), st.sampled_from([1, 3]),
       st.sampled_from(["zeros", "reflect"]), st.booleans())
def test_input_scale_fold_is_exact(seed, groups, kernel, padding_mode, bias):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 4, kernel, padding=kernel // 2, groups=groups, bias=bias,
                     padding_mode=padding_mode)
    scale = torch.rand(8) * 4 + 0.05
    x = torch.randn(2, 8, 6, 6)
    folded = fold_input_scale(conv, scale)
    with torch.no_grad():
        assert rel_err(conv(x * scale.view(1, -1, 1, 1)), folded(x)) < 1e-5


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1, 2]), st.booleans(),
       st.sampled_from([nn.ReLU(), nn.LeakyReLU(0.2), nn.Identity()]))
def test_output_scale_fold_through_homogeneous_ops_is_exact(seed, groups, bias, act):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias)
    scale = torch.rand(6) * 4 + 0.05
    x = torch.randn(2, 4, 6, 6)
    folded = fold_output_scale(conv, scale)
    with torch.no_grad():
        assert rel_err(act(conv(x)) * scale.view(1, -1, 1, 1), act(folded(x))) < 1e-5


def test_folds_copy_and_never_touch_the_original():
    conv = nn.Conv2d(3, 3, 1)
    before = conv.weight.detach().clone()
    new = fold_input_scale(conv, torch.full((3,), 2.0))
    assert new is not conv and new.weight is not conv.weight
    assert torch.equal(conv.weight, before)


def test_fold_rejects_bad_factors():
    conv = nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="positive homogeneity"):
        fold_output_scale(conv, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="2 factors for 3 channels"):
        fold_input_scale(conv, torch.ones(2))


@given(st.integers(1, 10 ** 6))
def test_reduction_chunks_divide_the_positions_into_chunks_of_at_least_64(positions):
    chunks = reduction_chunks(positions)
    assert 1 <= chunks <= MAX_REDUCTION_CHUNKS and positions % chunks == 0
    assert chunks == 1 or positions // chunks >= 64
    # the largest such divisor: none between it and the cap qualifies
    assert not any(positions % k == 0 and positions // k >= 64
                   for k in range(chunks + 1, MAX_REDUCTION_CHUNKS + 1))


@pytest.mark.parametrize("post_relu", [False, True])
def test_compiled_statistics_in_chunks_equal_the_eager_ones(post_relu):
    """Under torch.compile the per-(image, channel) statistics reduce in chunks of the
    positions (Inductor then has more rows to share among threads): the minimum and maximum
    are exactly eager's, the mean and scale equal up to float rounding."""
    x = torch.randn(2, 5, 24, 16).contiguous(memory_format=torch.channels_last)  # 384 → 6 chunks
    if post_relu:
        x = x.relu()
    assert reduction_chunks(24 * 16) == 6
    eager = dynamic_stats_minmax(x, post_relu)
    compiled = torch.compile(dynamic_stats_minmax, fullgraph=True)(x, post_relu)
    assert torch.equal(eager[2], compiled[2]) and torch.equal(eager[3], compiled[3])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    if post_relu:
        assert eager[1] is None and compiled[1] is None
    else:
        torch.testing.assert_close(compiled[1], eager[1], rtol=0, atol=1e-6)
    # the post-ReLU codes' centre reads the same chunked mean (fxquant/lower/subset.py)
    torch.testing.assert_close(torch.compile(channel_mean, fullgraph=True)(x),
                               x.mean((2, 3), keepdim=True), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=2, max_size=5), seed=st.integers(0, 999),
       channels_last=st.booleans(), bad=st.sampled_from([None, float("nan"), float("inf")]))
def test_eager_minimum_and_maximum_are_aminmax_bit_for_bit(shape, seed, channels_last, bad):
    """The eager statistics take amin and amax (aminmax along a dim is ~20× slower on the
    CPU): the same values, NaN and inf propagated alike, in any layout."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if bad is not None:
        x.view(-1)[seed % x.numel()] = bad
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    _, _, lo, hi = dynamic_stats_minmax(x, post_relu=False)
    ref_lo, ref_hi = torch.aminmax(x.reshape(shape[0], shape[1], -1), dim=2)
    assert lo.shape == tuple(shape[:2]) + (1,) * (len(shape) - 2)
    for value, ref in ((lo, ref_lo), (hi, ref_hi)):
        torch.testing.assert_close(value.reshape(ref.shape), ref, rtol=0, atol=0, equal_nan=True)
