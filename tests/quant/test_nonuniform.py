"""Non-uniform level sets (I²NQ): the invariants of fitted levels, the quantizer contract, the
uint8-grid snapping, and flex-scale weight adjustment against its objective."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.quant import UniformQuantizer
from fxquant.quant.fswa import adjust_weights, flex_scale, input_gram, output_error
from fxquant.quant.nonuniform import (
    LEVEL_METHODS,
    NonUniformQuantizer,
    _cell_sums,
    fit_levels,
    grid_codes,
)
from fxquant.quant.subset import midpoints

SHAPES = st.sampled_from(["normal", "laplace", "relu", "constant", "bimodal"])


def draw_samples(kind: str, rows: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, count, generator=g) * (1 + torch.arange(rows)).unsqueeze(1)
    if kind == "laplace":
        x = torch.sign(x) * x.abs().pow(2)
    elif kind == "relu":
        x = x.clamp(min=0)
    elif kind == "constant":
        x = torch.full_like(x, 0.75)
    elif kind == "bimodal":
        x = x + 10 * torch.sign(x)
    return x


@settings(max_examples=40, deadline=None)
@given(kind=SHAPES, bits=st.integers(1, 5), rows=st.integers(1, 4), seed=st.integers(0, 99),
       method=st.sampled_from(LEVEL_METHODS), pin=st.booleans())
def test_levels_strictly_increasing_at_most_2b_and_half_interval_error(kind, bits, rows, seed,
                                                                       method, pin):
    samples = draw_samples(kind, rows, 300, seed)
    levels = fit_levels(samples, 2 ** bits, method=method, pin_zero=pin)
    assert levels.shape == (rows, 2 ** bits)
    assert bool((levels[:, 1:] > levels[:, :-1]).all())
    assert torch.isfinite(levels).all()
    if pin and method != "uniform":
        assert bool((levels == 0).any(1).all())
    # inside [l_0, l_last] the error is at most half the widest interval
    quantizer = NonUniformQuantizer(bits, rows)
    quantizer.set_levels(levels)
    lo, hi = levels[:, :1], levels[:, -1:]
    x = (lo + (hi - lo) * torch.rand(rows, 500, generator=torch.Generator().manual_seed(seed)))
    x = x.t().reshape(500, rows, 1, 1)
    err = (quantizer.fake_quant(x) - x).abs().reshape(500, rows).amax(0)
    widest = levels.diff(dim=1).amax(1) if levels.shape[1] > 1 else torch.zeros(rows)
    assert bool((err <= widest / 2 * (1 + 1e-5) + 1e-6).all())


@settings(max_examples=25, deadline=None)
@given(kind=SHAPES, bits=st.integers(2, 4), seed=st.integers(0, 99),
       per_channel=st.booleans(), grid=st.booleans())
def test_integer_codes_round_trip_exactly(kind, bits, seed, per_channel, grid):
    samples = draw_samples(kind, 3, 200, seed)
    quantizer = NonUniformQuantizer(bits, 3 if per_channel else None)
    rows = samples if per_channel else samples.reshape(1, -1)
    quantizer.set_levels(fit_levels(rows, 2 ** bits))
    if grid:
        quantizer.snap_to_grid(8)
        quantizer.check()  # still strictly increasing after snapping
    x = draw_samples(kind, 3, 64, seed + 1).t().reshape(4, 16, 3).permute(0, 2, 1).reshape(4, 3, 4, 4)
    codes = quantizer.integer_codes(x)
    assert codes.codes.dtype == torch.int32
    assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) < 2 ** bits
    assert torch.equal(codes.dequantize(), quantizer.fake_quant(x))
    if grid:  # every level is a uint8 grid value: (code − zp)·scale
        g = quantizer.integer_grid()
        values = (quantizer.grid_levels.double() - float(g.zero_point)) * float(g.scale)
        assert torch.equal(values.float(), quantizer.levels.detach())


@settings(max_examples=60, deadline=None)
@given(kind=SHAPES, bits=st.integers(2, 4), seed=st.integers(0, 999), per_channel=st.booleans(),
       scale=st.sampled_from([1e-3, 0.07, 1.0, 13.0]))
def test_tidy_leaves_a_tidy_quantizer_bit_for_bit_alone(kind, bits, seed, per_channel, scale):
    """The reconstruct pass tidies its quantizers, and QAT tidies a copy of the start at every
    evaluation and again when it saves: re-deriving the grid from already snapped levels moved
    them by an ulp, which changed PAN x4 i2nq-w4a4-recon-256's Set5 PSNR by 0.03 dB."""
    samples = draw_samples(kind, 3, 200, seed) * scale
    quantizer = NonUniformQuantizer(bits, 3 if per_channel else None, learnable=True)
    rows = samples if per_channel else samples.reshape(1, -1)
    quantizer.set_levels(fit_levels(rows, 2 ** bits))
    quantizer.snap_to_grid(8)
    with torch.no_grad():  # what training does: the levels drift off their grid
        quantizer.levels.add_(torch.randn(quantizer.levels.shape,
                                          generator=torch.Generator().manual_seed(seed)) * 1e-3)
    quantizer.tidy()
    tidy = {k: v.clone() for k, v in quantizer.state_dict().items()}
    quantizer.tidy()
    assert all(torch.equal(v, tidy[k]) for k, v in quantizer.state_dict().items())


def test_fitting_is_deterministic_and_lloyd_max_beats_quantiles():
    samples = draw_samples("laplace", 4, 2000, 3)
    a = fit_levels(samples, 16)
    assert torch.equal(a, fit_levels(samples, 16))
    q = fit_levels(samples, 16, method="quantile")

    def mse(levels):
        quantizer = NonUniformQuantizer(4, 4)
        quantizer.set_levels(levels)
        x = samples.t().reshape(-1, 4, 1, 1)
        return float((quantizer.fake_quant(x) - x).pow(2).mean())

    assert mse(a) < mse(q)
    # on a heavy-tailed distribution non-uniform levels beat the best uniform grid
    assert mse(a) < mse(fit_levels(samples, 16, method="uniform"))


def scattered_cell_sums(ordered, levels):
    """The Lloyd-Max step's sums as fit_levels computed them before _cell_sums: every
    sample's cell index, then two scatter-adds."""
    index = torch.searchsorted(midpoints(levels).contiguous(), ordered)
    sums = torch.zeros_like(levels).scatter_add_(1, index, ordered)
    return sums, torch.zeros_like(levels).scatter_add_(1, index, torch.ones_like(ordered))


@settings(max_examples=60, deadline=None)
@given(kind=SHAPES, bits=st.integers(1, 5), rows=st.integers(1, 5),
       count=st.integers(1, 3000), seed=st.integers(0, 999), ties=st.booleans())
def test_cell_sums_are_the_scattered_sums_bit_for_bit(kind, bits, rows, count, seed, ties):
    samples = draw_samples(kind, rows, count, seed).double()
    levels = fit_levels(samples, 2 ** bits, method="quantile").double()
    if ties:  # samples exactly on midpoints go to the lower level in both
        mids = midpoints(levels)
        samples[:, : mids.shape[1]] = mids[:, : samples.shape[1]]
    ordered = samples.sort(dim=1).values.contiguous()
    sums, counts = _cell_sums(ordered, levels)
    expected_sums, expected_counts = scattered_cell_sums(ordered, levels)
    assert torch.equal(counts, expected_counts)
    assert int(counts.sum()) == rows * count
    filled = counts > 0  # an empty cell's sum is never read (fit_levels keeps its level)
    assert torch.equal(sums[filled], expected_sums[filled])


def test_lloyd_max_levels_are_those_of_the_scattered_sums():
    samples = draw_samples("laplace", 6, 4000, 11)
    with mock.patch("fxquant.quant.nonuniform._cell_sums", scattered_cell_sums):
        expected = fit_levels(samples, 16)
    assert torch.equal(fit_levels(samples, 16), expected)


def test_grid_codes_collide_apart_and_stay_in_range():
    levels = torch.tensor([[0.0, 1e-4, 2e-4, 3e-4], [-1.0, 0.0, 0.5, 1.0]])
    codes, scale, zero_point = grid_codes(levels, 8)
    assert bool((codes.diff(dim=1) >= 1).all())
    assert int(codes.min()) >= 0 and int(codes.max()) <= 255
    assert int(codes[1, 1]) == int(zero_point)  # 0 stays exactly on the grid
    assert float(scale) == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="do not fit"):
        grid_codes(torch.linspace(0, 1, 512).unsqueeze(0), 8)


def test_levels_learn_and_inputs_get_straight_through_gradients():
    quantizer = NonUniformQuantizer(2, None, learnable=True)
    quantizer.set_levels(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]))
    x = torch.tensor([-3.0, -0.9, 0.2, 0.4, 3.0]).reshape(1, 1, 5, 1).requires_grad_()
    quantizer(x).sum().backward()
    assert x.grad.reshape(-1).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # clipped outside
    # level k's gradient counts the values snapped to it
    assert quantizer.levels.grad.reshape(-1).tolist() == [2.0, 1.0, 1.0, 1.0]


def test_quantizer_refuses_bad_levels_by_name():
    quantizer = NonUniformQuantizer(2, 2)
    with pytest.raises(ValueError, match="shape"):
        quantizer.set_levels(torch.zeros(3, 4))
    quantizer.set_levels(torch.tensor([[0.0, 1.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match="strictly increasing"):
        quantizer.check()


def _layer(groups: int = 1, padding=1, padding_mode: str = "zeros"):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=padding, groups=groups, padding_mode=padding_mode)
    # spatially smooth, like features of natural images: neighbouring inputs correlate,
    # which is what error feedback along H⁻¹ exploits
    x = nn.functional.interpolate(torch.randn(16, 8, 4, 4), size=(10, 10), mode="bilinear")
    return conv, x * torch.linspace(0.2, 3, 8).view(1, 8, 1, 1)


@pytest.mark.parametrize("groups, padding, mode", [
    (1, 1, "zeros"), (4, 1, "zeros"), (1, "same", "zeros"), (1, 1, "reflect"),
    (4, 1, "circular"), (1, "same", "replicate")])
def test_gram_gives_the_output_error_of_the_conv(groups, padding, mode):
    """``eᵀ G e`` is the output energy of the conv with weights ``e``, padded as the conv
    pads (its ``padding_mode``; ``'same'`` resolved), not always with zeros."""
    conv, x = _layer(groups, padding, mode)
    noise = torch.randn_like(conv.weight) * 0.05
    quantized = conv.weight.detach() + noise
    gram = input_gram(conv, x)
    direct = conv._conv_forward(x, noise, None).pow(2).sum((0, 2, 3))
    assert torch.allclose(output_error(conv.weight, quantized, gram).float(), direct, rtol=1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_flex_scale_and_adjust_lower_the_output_error(groups):
    conv, x = _layer(groups)
    gram = input_gram(conv, x)
    quantizer = UniformQuantizer(3, channels=8, ch_axis=0, ndim=4)
    weight = conv.weight.detach()
    flat = weight.reshape(8, -1)
    from fxquant.quant.uniform import affine_qparams

    quantizer.set_qparams(*affine_qparams(flat.amin(1), flat.amax(1), 3, include_zero=False))
    minmax = output_error(weight, quantizer.fake_quant(weight), gram)
    ratios = flex_scale(weight, quantizer, gram)
    flexed = output_error(weight, quantizer.fake_quant(weight), gram)
    assert bool((flexed <= minmax + 1e-9).all()) and float(flexed.sum()) < float(minmax.sum())
    assert bool(((ratios >= 0.3 - 1e-6) & (ratios <= 1)).all())
    adjusted = adjust_weights(weight, quantizer, gram)
    assert torch.equal(quantizer.fake_quant(adjusted), adjusted)  # on the grid already
    assert float(output_error(weight, adjusted, gram).sum()) < 0.7 * float(flexed.sum())


@settings(max_examples=25, deadline=None)
@given(kind=SHAPES, bits=st.integers(2, 4), seed=st.integers(0, 99),
       per_channel=st.booleans(), grid=st.booleans(), sliced=st.booleans())
def test_channels_last_inputs_give_the_same_values_and_keep_their_layout(kind, bits, seed,
                                                                          per_channel, grid,
                                                                          sliced):
    """A channels-last input (or a channel slice of one, as a split makes) is quantized to
    the same values and codes as its NCHW copy, and the result stays channels-last, also
    through the lowered lookup, so the conv after it needs no conversion."""
    from fxquant.lower.codebook import CodebookQuantize

    samples = draw_samples(kind, 3, 200, seed)
    quantizer = NonUniformQuantizer(bits, 3 if per_channel else None)
    quantizer.set_levels(fit_levels(samples if per_channel else samples.reshape(1, -1), 2 ** bits))
    if grid:
        quantizer.snap_to_grid(8)
    channels = 5 if sliced else 3
    x = draw_samples(kind, channels, 2 * 7 * 6, seed + 1).t().contiguous()
    x = x.reshape(2, 7, 6, channels)
    x = x.permute(0, 3, 1, 2)  # N×C×H×W, channels innermost in memory
    x = x[:, 1:4] if sliced else x
    assert not x.is_contiguous() and x.stride(1) == 1
    dense = x.contiguous()
    out = quantizer.fake_quant(x)
    assert torch.equal(out, quantizer.fake_quant(dense))
    assert torch.equal(quantizer.codes(x), quantizer.codes(dense))
    if grid:
        assert out.stride(1) == 1  # channels innermost
        lowered = CodebookQuantize.from_quantizer(quantizer, channels_last=False)
        codes = lowered(x)
        assert torch.equal(codes, lowered(dense)) and codes.stride(1) == 1


@settings(max_examples=30, deadline=None)
@given(kind=SHAPES, bits=st.integers(2, 4), seed=st.integers(0, 99),
       per_channel=st.booleans(), grid=st.booleans(), channels_last=st.booleans())
def test_the_clipped_straight_through_function_gives_the_arithmetic_forms_gradients(
        kind, bits, seed, per_channel, grid, channels_last):
    """ClippedStraightThrough replaced ``q + (x − x.detach())·inside`` for speed: the values,
    the input's gradient (clipped outside the outer levels, exact zeros there) and the levels'
    gradient stay the same bit for bit, and on the grid a channels-last input's gradient stays
    channels-last."""
    import contextlib
    from unittest import mock

    def arithmetic(x, q, lo, hi):
        return q + (x - x.detach()) * ((x >= lo) & (x <= hi))

    samples = draw_samples(kind, 3, 200, seed)
    quantizer = NonUniformQuantizer(bits, 3 if per_channel else None, learnable=True)
    quantizer.set_levels(fit_levels(samples if per_channel else samples.reshape(1, -1), 2 ** bits))
    if grid:
        quantizer.snap_to_grid(8)
    # 1.5× the fitted span, so that some values fall outside the outer levels
    x = 1.5 * draw_samples(kind, 3, 2 * 5 * 4, seed + 1).t().contiguous()
    x = x.reshape(2, 5, 4, 3).permute(0, 3, 1, 2)  # N×C×H×W, channels innermost in memory
    x = x if channels_last else x.contiguous()
    assert (x.stride(1) == 1) == channels_last
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    upstream = upstream.contiguous(memory_format=torch.channels_last) if channels_last else upstream
    results = []
    for form in (None, arithmetic):
        quantizer.levels.grad = None
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        patch = (mock.patch("fxquant.quant.nonuniform.clipped_straight_through", form) if form
                 else contextlib.nullcontext())
        with patch:
            out = quantizer(leaf)
        out.backward(upstream)
        results.append((out.detach(), leaf.grad, quantizer.levels.grad.clone()))
    (out, grad_x, grad_levels), (ref_out, ref_x, ref_levels) = results
    assert torch.equal(out, ref_out)
    assert torch.equal(grad_x, ref_x) and torch.equal(grad_levels, ref_levels)
    table = quantizer.levels.detach() if per_channel else quantizer.levels.detach().expand(3, -1)
    outside = (x < table[:, :1].view(1, 3, 1, 1)) | (x > table[:, -1:].view(1, 3, 1, 1))
    assert bool((grad_x[outside] == 0).all())
    if channels_last and grid:  # the grid lookup keeps the layout (see the test above)
        assert grad_x.stride(1) == 1
