"""DAQ lowered (fxquant/lower/daq.py): the codes are the fake-quant levels, the border-exact
weight fold equals the conv of the de-quantized input, oneDNN's int32 accumulator stays in its
bound, the lowered model follows the fake-quant model, and what cannot lower is named."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.errors import PassError
from fxquant.lower.compare import daq_layer_agreement
from fxquant.lower.border import add_border
from fxquant.lower.conv import INT32_MAX
from fxquant.lower.daq import DaqQuantize, daq_input_codes
from fxquant.lower.int8_pairs import needs_split, split_weight_codes
from fxquant.lower.folded import (
    CpuDaqConv2d,
    DaqConv2d,
    ReferenceDaqConv2d,
    onednn_accumulator_bound,
    requantize_folded,
)
from fxquant.lower.planes import split_planes
from fxquant.quant import QuantConv2d
from fxquant.quant.daq import DAQActivationQuantizer, daq_quantize, step_for_bits
from fxquant.quant.daq_weights import DAQWeightQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

U32, U64 = 2.0 ** -24, 2.0 ** -53  # unit roundoffs of float32 / float64


def daq_layer(seed, groups, ci, co, k, stride, dilation, padding, wb, ab, branch, mixed,
              qq=0, bias=True, shape=(9, 7)):
    """A random DAQ conv: (activation quantizer, QuantConv2d with DAQ weights, raw input)."""
    torch.manual_seed(seed)
    cin, cout = ci * groups, co * groups
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, bias=bias)
    bits = torch.randint(max(ab - 1, 2), min(ab + 1, 8) + 1, (cin,)) if mixed else ab
    wq = DAQWeightQuantizer(conv.weight.shape, bits if mixed else wb, groups=groups,
                            step_index="initial")
    qconv = QuantConv2d(conv, wq)
    act = DAQActivationQuantizer(cin, bits, branch=branch, qq_bits=qq)
    x = torch.randn(2, cin, *shape) * torch.rand(1, cin, 1, 1) * 3 + torch.randn(1, cin, 1, 1)
    if branch != "signed":
        x = torch.relu(x)
    return act, qconv, x


def lowered_pair(act, qconv, cls):
    codes = DaqQuantize.from_quantizer(act, cls.channels_last)
    return codes, cls.from_quantized(qconv)


layer_cases = st.tuples(
    st.integers(0, 10_000),                      # seed
    st.sampled_from([1, 2, 3]),                  # groups
    st.integers(1, 4), st.integers(1, 3),        # channels per group in / out
    st.sampled_from([1, 2, 3, 5]),               # kernel
    st.sampled_from([1, 2]),                     # stride
    st.sampled_from([1, 2]),                     # dilation
    st.integers(0, 3),                           # padding
    st.integers(2, 5), st.integers(2, 8),        # weight / activation bits
    st.sampled_from(["signed", "relu", "relu-clipped"]),
    st.booleans(),                               # mixed precision (per-channel bits)
    st.sampled_from([0, 4]),                     # σ quantization bits
)


def _valid(case) -> bool:
    _, _, _, _, k, _, d, p, *_ = case
    return 9 + 2 * p - d * (k - 1) >= 1 and 7 + 2 * p - d * (k - 1) >= 1


@settings(max_examples=60, deadline=None)
@given(layer_cases)
def test_codes_are_the_fake_quant_levels(case):
    """``Δ·q + β`` (float64) is the fake-quantizer's output up to its float32 rounding:
    |x̂_fq − x̂| <= u32·(|Δ·r| + |x̂|) per element, far below the half step a different code
    would make."""
    seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq = case
    act, _, x = daq_layer(seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq)
    q, step, offset, _ = daq_input_codes(x, act._bits_arg(), branch, qq)
    assert bool((q >= 0).all()) and bool((q == q.round()).all())
    if branch != "relu":
        assert bool((q <= 2 ** act.bits.view(1, -1, 1, 1) - 1).all())
    exact = step.double() * q.double() + offset.double()
    fake = daq_quantize(x, act._bits_arg(), branch=branch, qq_bits=qq).double()
    mu = offset.double().abs() + (2 ** act.bits.view(1, -1, 1, 1) * step).double()
    tol = 2 * U32 * (step.double() * q.double() + mu + exact.abs())
    assert bool(((fake - exact).abs() <= tol).all())


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 8), st.integers(1, 40), st.floats(0.0, 0.5),
       st.floats(1e-4, 10.0))
def test_unclipped_relu_codes_are_bounded_by_the_positive_count(seed, bits, side, spread, level):
    """The HEAD post-ReLU codes ``round(x/Δ)`` have no clip, but Cauchy–Schwarz with the +1
    in the count bounds them: Σx² <= n⁺²·σ² (σ² = Σx²/n⁺ − (Σx/n⁺)² and (Σx)² <= (n⁺ − 1)·Σx²),
    so x <= n⁺·σ and q <= n⁺/s + 1 with n⁺ <= H·W + 1 (s the step of the table; without σ
    quantization). At 4 bits on a 128² input: q <= 27 962 (int16); on Set5 the largest seen is
    far lower (docs/lowering.md)."""
    torch.manual_seed(seed)
    x = torch.relu(level * (1 + spread * torch.randn(1, 3, side, side)))
    q, step, _, _ = daq_input_codes(x, bits, "relu")
    count = (x > 0).sum(dim=(2, 3), keepdim=True) + 1
    s = step_for_bits(bits)
    assert bool((q <= count / s + 1).all())


def magnitude_conv(layer: DaqConv2d, a: torch.Tensor) -> torch.Tensor:
    """conv(|a|, |Ŵ|) in float64: the sum of |terms| that rounding errors are relative to."""
    return F.conv2d(a, layer.weight(torch.float64).abs(), None, layer.stride, layer.padding,
                    layer.dilation, layer.groups)


@settings(max_examples=60, deadline=None)
@given(layer_cases)
def test_border_corrected_fold_equals_the_conv_of_the_dequantized_input(case):
    """Reference fold (``Σ (Ŵ·Δ) ⋆ q`` + the border-exact offset term, float64) against
    ``conv(Δ·q + β, Ŵ)`` in float64 with zero padding: both sum n = fan-in + k² products
    whose magnitudes add up to at most ``conv(|Δq| + |β|, |Ŵ|)``, so they differ by at most
    ``2·γ_n`` of that (γ_n = n·u64/(1 − n·u64)), plus the float32 output rounding (u32·|y|)."""
    seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq = case
    if not _valid(case):
        return
    act, qconv, x = daq_layer(seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq)
    codes, ref = lowered_pair(act, qconv, ReferenceDaqConv2d)
    packed = codes(x)
    q, step, offset, _ = packed
    xhat = step.double() * q.double() + offset.double()
    w = ref.weight(torch.float64)
    expected = F.conv2d(xhat, w, None if qconv.bias is None else qconv.bias.double(),
                        ref.stride, ref.padding, ref.dilation, ref.groups)
    out = ref(packed).double()
    n = ref.fan_in + k * k + 2
    gamma = n * U64 / (1 - n * U64)
    mags = magnitude_conv(ref, (step * q).double().abs() + offset.double().abs())
    tol = 2 * gamma * mags + U32 * expected.abs() + 1e-300
    assert bool(((out - expected).abs() <= tol).all())


@settings(max_examples=40, deadline=None)
@given(layer_cases)
def test_reference_equals_the_fake_quant_conv_within_float32_rounding(case):
    """Against the float32 fake-quant conv ``conv(x̂_fq, Ŵ_fq)``: the fake-quantizer rounds
    each x̂ (<= u32·(|Δ·r| + |μ| + |x̂|)) and each Ŵ (<= u32·|Ŵ|) once, and accumulates
    n = fan-in products in float32 (<= γ_n·Σ|terms|): with A = |x̂| + |Δ·q| + |β| + |μ|
    bounding every term, |y_fq − y| <= (n + 4)·u32·conv(A, |Ŵ|)·(1 + o(1)) + u32·|bias|."""
    seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq = case
    if not _valid(case):
        return
    act, qconv, x = daq_layer(seed, g, ci, co, k, s, d, p, wb, ab, branch, mixed, qq)
    codes, ref = lowered_pair(act, qconv, ReferenceDaqConv2d)
    with torch.no_grad():
        fake = qconv(act(x)).double()
        packed = codes(x)
        out = ref(packed).double()
    q, step, offset, _ = packed
    xhat = step.double() * q.double() + offset.double()
    span = (2 ** act.bits.view(1, -1, 1, 1) * step).double()
    a = xhat.abs() + (step * q).double().abs() + offset.double().abs() * 2 + span
    n = ref.fan_in
    bias = 0 if qconv.bias is None else qconv.bias.double().abs().view(1, -1, 1, 1)
    tol = 1.01 * (n + 4) * U32 * magnitude_conv(ref, a) + U32 * (bias + fake.abs()) + 1e-30
    assert bool(((out - fake).abs() <= tol).all())


def test_without_the_border_correction_the_offset_term_is_wrong_at_the_border():
    """The offset term is a conv of a constant plane with zero padding: a per-channel
    constant (its interior value) is exact inside and wrong on the border rows/columns."""
    act, qconv, x = daq_layer(3, 1, 8, 8, 3, 1, 1, 1, 4, 4, "signed", False, shape=(12, 12))
    codes, ref = lowered_pair(act, qconv, ReferenceDaqConv2d)
    _, _, offset, _ = codes(x)
    w = ref.weight(torch.float64)
    border_exact = ref.offset_term(offset, w, (12, 12))
    plane = F.conv2d(offset.double().expand(-1, -1, 12, 12), w, None, 1, 1)
    torch.testing.assert_close(border_exact, plane, rtol=1e-12, atol=1e-12)
    interior = (offset.double().view(2, 1, -1, 1, 1) * w.unsqueeze(0)).sum((2, 3, 4))
    assert torch.allclose(plane[:, :, 1:-1, 1:-1],
                          interior.view(2, -1, 1, 1).expand(-1, -1, 10, 10))
    assert float((plane[:, :, 0] - interior.view(2, -1, 1)).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- cpu / int32
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([1, 2]), st.integers(1, 6), st.sampled_from([1, 3]))
def test_onednn_accumulator_reaches_its_bound_exactly_and_stays_int32(seed, groups, ci, k):
    """All-255 codes against all-±127 weights reach ``fan-in·255·127`` exactly (unit
    scales: the float32 output is the int32 accumulator, exact below 2^24), and the bound
    is what the pass checks against 2^31 − 1."""
    torch.manual_seed(seed)
    cin, cout = ci * groups, 2 * groups
    fan_in = ci * k * k
    codes = torch.full((1, cin, 6, 6), 255, dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    sign = torch.where(torch.rand(cout, ci, k, k) < 0.5, -1, 1)
    sign[0] = 1
    w = (127 * sign).to(torch.int8)
    # on a CPU whose int8 pairs saturate (no VNNI), as the cpu target runs it: split weights
    y = 0
    for part in (split_weight_codes(w) if needs_split(255, w) else [w]):
        packed = torch.ops.onednn.qconv_prepack(part, torch.ones(cout), 1.0, 0, [1, 1], [0, 0],
                                                [1, 1], groups, None)
        y = y + torch.ops.onednn.qconv_pointwise(
            codes, 1.0, 0, packed, torch.ones(cout), torch.zeros(cout, dtype=torch.int64), None,
            [1, 1], [0, 0], [1, 1], groups, 1.0, 0, torch.float32, "none", [None], "")
    exact = F.conv2d(codes.double(), w.double(), None, 1, 0, 1, groups)
    assert torch.equal(y.double(), exact)
    assert float(y.abs().max()) == onednn_accumulator_bound(fan_in)
    assert onednn_accumulator_bound(66_311) <= INT32_MAX < onednn_accumulator_bound(66_312)


def test_relu_codes_above_255_split_into_exact_uint8_planes():
    codes = torch.tensor([0, 1, 255, 256, 1000, 65535, 65536, 2 ** 24 + 3]).view(1, 8, 1, 1)
    planes = split_planes(codes.to(torch.int32))
    assert all(p.dtype == torch.uint8 for p in planes)
    assert torch.equal(sum(p.long() * 256 ** k for k, p in enumerate(planes)), codes)


def test_cpu_follows_reference_with_outlier_relu_codes_above_255():
    """A nearly constant post-ReLU channel at 8 bits: σ ≈ c/sqrt(n) (the +1 in the count),
    so q ≈ sqrt(n)/s = 20/0.057 ≈ 350 > 255. The cpu target splits the codes into two uint8
    planes and stays within its weight-requantization error of the reference (half an int8
    step of each (image, output channel)'s folded weights, times Σ q over the receptive
    field)."""
    act, qconv, x = daq_layer(5, 1, 6, 4, 3, 1, 1, 1, 4, 8, "relu", False, shape=(20, 20))
    x[:, 2] = 5 + 0.01 * torch.rand(2, 20, 20)
    ref_codes, ref = lowered_pair(act, qconv, ReferenceDaqConv2d)
    cpu_codes, cpu = lowered_pair(act, qconv, CpuDaqConv2d)
    cpu.weight_planes = 1  # the bound below is the one-plane requantization's
    packed = ref_codes(x)
    assert ref_codes.max_code > 255
    with torch.no_grad():
        expected, out = ref(packed), cpu(cpu_codes(x))
    q, step, _, _ = packed
    _, wscale = requantize_folded(cpu.folded_weight(step.float(), cpu.weight(torch.float32)))
    window = F.conv2d(q.double(), torch.ones(1, 6, 3, 3, dtype=torch.float64), None, 1, 1)
    tol = 0.5 * wscale.double().view(2, -1, 1, 1) * window + 1e-4 * expected.abs().double() + 1e-5
    assert bool(((out.double() - expected.double()).abs() <= tol).all())


# ----------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("recipe", ["daq-w4a4", "daq-mp4", "daq-w4a4qq4", "daq-w4a4-reluclip"])
def test_lowered_tiny_model_follows_fake_quant(tiny_sr, calib, recipe):
    x = torch.rand(2, 3, 12, 10)
    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    ref = fxquant.lowered_copy(fake, "reference")
    cpu = fxquant.lowered_copy(fake, "cpu")
    kinds = [type(ref.get_submodule(n.target)).__name__ for n in ref.graph.nodes
             if n.op == "call_module"]
    block = ["DaqQuantize", "ReferenceDaqConv2d", "ReLU", "DaqQuantize", "ReferenceDaqConv2d"]
    assert kinds == ["InputGuard", "Conv2d", *block, *block, "Conv2d"]
    assert not any(isinstance(m, (DAQActivationQuantizer, QuantConv2d)) for m in ref.modules())
    assert isinstance(cpu.get_submodule("blocks_0_0"), CpuDaqConv2d)
    info = dict(ref.fxquant_history)["lower"]
    assert info["integer_convs"] == 4 and "DaqQuantize" not in info["float_ops"]
    for name, rel, _ in daq_layer_agreement(fake, ref, [x]):
        assert rel < 1e-5, (name, rel)
    for name, rel, _ in daq_layer_agreement(fake, cpu, [x]):
        assert rel < 1e-3, (name, rel)  # two int8 planes of the per-image folded weights
    with torch.no_grad():
        y_fake, y_ref, y_cpu = fake(x), ref(x), cpu(x)
    span = float(y_fake.max() - y_fake.min())
    assert float((y_ref - y_fake).abs().max()) < 1e-4 * span
    assert float((y_cpu - y_fake).abs().max()) < 5e-2 * span


def test_one_weight_plane_is_the_lossy_requantization(tiny_sr, calib):
    """One int8 plane of the per-image folded weights: a few per cent of a layer's range; the
    default second plane for the residual brings it below 1e-3."""
    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)
    cpu = fxquant.lowered_copy(fake, "cpu")
    x = torch.rand(2, 3, 12, 10)
    two = max(rel for _, rel, _ in daq_layer_agreement(fake, cpu, [x]))
    one_plane = fxquant.lowered_copy(fake, "cpu", planes=1)  # lower{target=cpu,planes=1}
    assert {m.weight_planes for m in one_plane.modules() if isinstance(m, CpuDaqConv2d)} == {1}
    one = max(rel for _, rel, _ in daq_layer_agreement(fake, one_plane, [x]))
    assert two < 1e-3 < one < 0.05


def test_compiled_cpu_target_matches_eager(tiny_sr, calib):
    """lower{target=cpu,compile=true}: Inductor compiles the statistics and codes (the convs,
    with their per-image prepack, stay eager); the same codes up to rounding-boundary ties.
    Inductor's reductions round differently from eager's, so a code at a tie can flip and move
    every later layer's statistics (0.007 on one input of this model): the inputs are seeded
    ones without a tie."""
    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu")
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    for seed in range(3):
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_lowered_daq_model_saves_and_loads(tiny_sr, calib, tmp_path):
    fake = fxquant.compile(tiny_sr, "daq-mp4", calib=calib)
    gm = fxquant.lowered_copy(fake, "reference")
    path = tmp_path / "m.fxq"
    fxquant.save(gm, path)
    loaded = fxquant.load(path, model=type(tiny_sr)())
    x = torch.rand(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        assert torch.equal(copy.deepcopy(gm)(x), gm(x))


# ----------------------------------------------------------------------------- errors
def _daq_pipeline(tiny_sr, calib, recipe, target):
    spec = fxquant.compile(tiny_sr, recipe, calib=calib).fxquant_pipeline
    return spec.replace(",verify", "") + f",lower{{target={target}}}"


def test_initial_commit_relu_branch_has_no_integer_form(tiny_sr, calib):
    recipe = fxquant.Recipe.from_dict({"method": "daq", "options": {"post_relu": "initial"}})
    pipeline = _daq_pipeline(tiny_sr, calib, recipe, "reference")
    with pytest.raises(PassError, match="branch 'relu-initial'.*no integer form"):
        fxquant.compile(tiny_sr, recipe, calib=calib, pipeline=pipeline)


def test_fan_in_beyond_the_onednn_bound_is_refused_on_cpu():
    """3×3 conv over 7 400 channels: fan-in 66 600 > 66 311, the int32 bound at 255·127."""
    model = nn.Sequential(nn.Conv2d(3, 7400, 1), nn.Conv2d(7400, 2, 3, padding=1),
                          nn.Conv2d(2, 3, 1)).eval()
    calib = torch.rand(2, 3, 8, 8)
    recipe = fxquant.Recipe.from_dict({"method": "daq", "layers": {"exclude": []}})
    fake = fxquant.compile(model, recipe, calib=calib)
    assert fxquant.lowered_copy(fake, "reference") is not None  # float64 accumulation: fine
    with pytest.raises(PassError, match="fan-in 66600 can overflow oneDNN's int32"):
        fxquant.lowered_copy(fake, "cpu")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1, 3, 5]), st.sampled_from([1, 2]),
       st.sampled_from([1, 2]), st.integers(0, 3), st.integers(1, 9), st.integers(1, 9))
def test_border_strips_equal_the_full_offset_plane(seed, k, s, d, p, h, w):
    """cpu: the interior value in the bias plus :func:`add_border` on the strips equals the
    full separable offset plane (float32, relative to Σ|V|)."""
    if h + 2 * p - d * (k - 1) < 1 or w + 2 * p - d * (k - 1) < 1:
        return
    torch.manual_seed(seed)
    layer = CpuDaqConv2d(4, 3, (k, k), (s, s), (p, p), (d, d), 1, False)
    weight, offset = torch.randn(3, 4, k, k), torch.randn(2, 4, 1, 1)
    full = layer.offset_term(offset, weight, (h, w))
    v, rows, cols = layer.offset_taps(offset, weight, (h, w))
    y = v.sum((2, 3))[:, :, None, None].expand_as(full).contiguous()
    out = add_border(y, v, rows, cols)
    tol = 1e-5 * float(v.abs().sum((2, 3)).max())
    assert float((out - full).abs().max()) <= tol
