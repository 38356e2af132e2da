"""The uniform quantizer's math: properties with hypothesis, gradients, qparams."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from fxquant.quant import UniformQuantizer, affine_qparams, fake_quantize, symmetric_qparams
from fxquant.quant.uniform import symmetric_range, unsigned_range

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
values = st.lists(finite, min_size=1, max_size=200)
bits = st.integers(2, 16)


def _quantizer(lo: float, hi: float, b: int):
    scale, zp = affine_qparams(torch.tensor(lo), torch.tensor(hi), b)
    qmin, qmax = unsigned_range(b)
    return lambda x: fake_quantize(x, scale, zp, qmin, qmax), scale, zp


@settings(max_examples=200, deadline=None)
@given(values, finite, finite, bits)
def test_at_most_2_to_the_b_levels(xs, a, c, b):
    lo, hi = min(a, c), max(a, c)
    q, _, _ = _quantizer(lo, hi, b)
    assert torch.unique(q(torch.tensor(xs))).numel() <= 2 ** b


@settings(max_examples=200, deadline=None)
@given(values, finite, finite, bits)
def test_error_at_most_half_a_step_inside_the_range(xs, a, c, b):
    lo, hi = min(a, c, 0.0), max(a, c, 0.0)
    q, scale, zp = _quantizer(lo, hi, b)
    x = torch.tensor(xs, dtype=torch.float32)
    qmin, qmax = unsigned_range(b)
    low, high = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= low) & (x <= high)
    err = (q(x) - x).abs()[inside]
    # half a step, plus float32 rounding of x̂ = (q − z)·s itself (at 16 bits and |x| ~ 700
    # an ulp of x̂ is 6e-5, a visible part of a 0.016 step)
    slack = 4 * torch.finfo(torch.float32).eps * x.abs()[inside]
    assert (err <= scale / 2 * (1 + 1e-4) + 1e-6 + slack).all()


@settings(max_examples=200, deadline=None)
@given(values, finite, finite, bits)
def test_idempotent(xs, a, c, b):
    q, _, _ = _quantizer(min(a, c), max(a, c), b)
    once = q(torch.tensor(xs))
    assert torch.equal(q(once), once)


@settings(max_examples=200, deadline=None)
@given(values, finite, finite, bits)
def test_clamps_outside_the_range(xs, a, c, b):
    q, scale, zp = _quantizer(min(a, c), max(a, c), b)
    qmin, qmax = unsigned_range(b)
    low, high = float((qmin - zp) * scale), float((qmax - zp) * scale)
    x = torch.tensor(xs)
    out = q(x)
    assert torch.allclose(out[x > high], torch.tensor(high), rtol=1e-6, atol=0) or not (x > high).any()
    assert torch.allclose(out[x < low], torch.tensor(low), rtol=1e-6, atol=0) or not (x < low).any()
    assert (out >= low - 1e-6 * abs(low)).all() and (out <= high + 1e-6 * abs(high)).all()


@given(finite, finite, bits)
def test_activation_range_contains_zero_exactly(a, c, b):
    q, _, _ = _quantizer(min(a, c), max(a, c), b)
    assert float(q(torch.zeros(1))) == 0.0


def test_symmetric_levels_are_odd_and_centred():
    scale, zp = symmetric_qparams(torch.tensor(1.0), 4)
    qmin, qmax = symmetric_range(4)
    out = fake_quantize(torch.linspace(-2, 2, 1001), scale, zp, qmin, qmax)
    levels = torch.unique(out)
    assert levels.numel() == 15
    assert torch.allclose(levels, -levels.flip(0))
    assert float(levels.max()) == 1.0


def test_weight_grid_without_zero_matches_dfsq_formula():
    """DFSQ: Ŵ = Δ·clip(round(W/Δ), round(lo/Δ), round(lo/Δ) + 2^b - 1) (METHODS.md §3.6)."""
    w = torch.tensor([0.3, 0.35, 0.9, 1.2])
    b = 3
    scale, zp = affine_qparams(w.min(), w.max(), b, include_zero=False)
    delta = (w.max() - w.min()) / (2 ** b - 1)
    low = torch.round(w.min() / delta)
    expected = delta * torch.clamp(torch.round(w / delta), low, low + 2 ** b - 1)
    assert torch.allclose(fake_quantize(w, scale, zp, 0, 2 ** b - 1), expected)


def test_straight_through_gradient_is_identity_inside_and_zero_outside():
    quantizer = UniformQuantizer(4)
    quantizer.set_qparams(*affine_qparams(torch.tensor(-1.0), torch.tensor(1.0), 4))
    x = torch.tensor([-3.0, -0.33, 0.1, 0.77, 5.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_learnable_scale_receives_gradient():
    quantizer = UniformQuantizer(4, learnable=True)
    quantizer.set_qparams(torch.tensor(0.1), torch.tensor(8.0))
    quantizer(torch.linspace(-1, 1, 50)).pow(2).sum().backward()
    assert quantizer.scale.grad is not None and quantizer.scale.grad.abs() > 0


def test_per_channel_quantizer_uses_each_channels_scale():
    quantizer = UniformQuantizer(8, channels=2)
    quantizer.set_qparams(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 0.0]))
    x = torch.full((1, 2, 1, 1), 0.26)
    out = quantizer(x).flatten()
    assert torch.allclose(out, torch.tensor([0.3, 0.0]))


def test_check_rejects_bad_scales():
    quantizer = UniformQuantizer(8)
    quantizer.set_qparams(torch.tensor(float("nan")), torch.tensor(0.0))
    try:
        quantizer.check()
    except ValueError as exc:
        assert "non-finite" in str(exc)
    else:
        raise AssertionError("check() accepted a NaN scale")
