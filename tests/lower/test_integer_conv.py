"""Integer convolutions: the reference oracle against the fake-quant layer, oneDNN against the
reference bit for bit at the accumulator, and the int32 overflow bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.lower import CpuConv2d, ReferenceConv2d, accumulator_bound
from fxquant.lower.conv import INT32_MAX, LoweringError, centre_codes
from fxquant.quant.fitting import weight_quantizer
from fxquant.quant import QuantConv2d, UniformQuantizer
from fxquant.quant.uniform import affine_qparams
from fxquant.recipe import WeightConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def quantized_conv(seed, cin, cout, k, groups, stride, w_bits, a_bits, symmetric, bias=True):
    """A fake-quant conv (QuantConv2d + its input quantizer) fitted to random data."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)
    with torch.no_grad():  # some channels all-positive: their min/max codes do not fit int8
        conv.weight[: cout // 2] = conv.weight[: cout // 2].abs() + 0.05
    config = WeightConfig(bits=w_bits, observer="symmetric" if symmetric else "minmax")
    qconv = QuantConv2d(conv, weight_quantizer(conv, config, w_bits))
    x = torch.randn(2, cin, 9, 7) * 2 + 0.5
    act = UniformQuantizer(a_bits)
    act.set_qparams(*affine_qparams(x.min() * 0.8, x.max() * 0.8, a_bits))  # some clipping
    return act, qconv, x


layer_cases = st.tuples(
    st.integers(0, 10_000),                      # seed
    st.sampled_from([1, 2, 4]),                  # groups
    st.integers(1, 3),                           # channels per group (in)
    st.integers(1, 3),                           # channels per group (out)
    st.sampled_from([1, 3, 5]),                  # kernel
    st.sampled_from([1, 2]),                     # stride
    st.integers(2, 8), st.integers(2, 8),        # weight / activation bits
    st.booleans(),                               # symmetric weights
)


@settings(max_examples=40, deadline=None)
@given(layer_cases)
def test_reference_equals_fake_quant_within_float_rounding(case):
    seed, groups, ci, co, k, stride, wb, ab, sym = case
    act, qconv, x = quantized_conv(seed, ci * groups, co * groups, k, groups, stride, wb, ab, sym)
    ref = ReferenceConv2d.from_quantized(act, qconv)
    with torch.no_grad():
        fake = qconv(act(x))
        out = ref(ref.codes_of(x))
    unit = (act.scale * qconv.weight_quantizer.scale.reshape(-1)).view(1, -1, 1, 1)
    # the same integers; only float32 rounding differs (of the rescale, and of the fake-quant
    # conv's own accumulation, relative to the largest term): far below one step (s_x·s_w)
    tol = 0.01 * unit + 1e-5 * fake.abs() + 1e-6 * float(fake.abs().max())
    assert bool(((out - fake).abs() <= tol).all())


@settings(max_examples=40, deadline=None)
@given(layer_cases)
def test_cpu_accumulator_is_bit_exact_against_the_reference(case):
    """With unit scales and no bias the float32 output *is* the int32 accumulator (exact
    below 2^24), so this compares oneDNN's integer arithmetic to the oracle's exactly,
    including the all-ones correction rows of centred (asymmetric) weights."""
    seed, groups, ci, co, k, stride, wb, ab, sym = case
    act, qconv, x = quantized_conv(seed, ci * groups, co * groups, k, groups, stride, wb, ab, sym,
                                   bias=False)
    ref = ReferenceConv2d.from_quantized(act, qconv)
    state = ref.state_dict()
    state["weight_scale"] = torch.ones_like(state["weight_scale"])
    state["input_scale"] = torch.ones(())
    cpu = CpuConv2d(*_shape_args(ref))
    cpu.load_state_dict(state, strict=False)  # the reference has no uint8-output buffers
    ref.load_state_dict(state)
    codes = ref.codes_of(x)
    acc, window_sum = ref.integer_accumulators(codes)
    total = acc.long()
    if window_sum is not None:
        c = ref.weight_centre.view(1, groups, -1, 1, 1)
        n, _, h, w = acc.shape
        total = (total.view(n, groups, -1, h, w) + c * window_sum.long().view(n, groups, 1, h, w)
                 ).view(n, -1, h, w)
    if total.abs().max() < 2 ** 24:  # exact in float32: both targets give the integers
        assert torch.equal(cpu(codes), total.float())
        assert torch.equal(ref(codes), total.float())
    else:  # a constant weight channel (huge centre): same float formula on both
        torch.testing.assert_close(cpu(codes), ref(codes), rtol=1e-6, atol=0)


def _shape_args(layer):
    return (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
            layer.padding, layer.dilation, layer.groups, layer.bias is not None, layer.act_bits)


def test_cpu_output_is_within_a_few_ulp_of_the_reference():
    act, qconv, x = quantized_conv(1, 16, 16, 3, 1, 1, 8, 8, False)
    ref, cpu = (cls.from_quantized(act, qconv) for cls in (ReferenceConv2d, CpuConv2d))
    with torch.no_grad():
        a, b = ref(ref.codes_of(x)), cpu(cpu.codes_of(x))
    # same int32 accumulators; oneDNN rescales and adds the bias in its own order
    assert bool(((a - b).abs() <= 4 * torch.finfo(torch.float32).eps * (a.abs() + 1)).all())


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([1, 3, 5]), st.integers(1, 64), st.integers(2, 8), st.booleans())
def test_the_worst_input_reaches_the_accumulator_bound_exactly(kernel, channels, act_bits, low):
    """Every code at an extreme and every weight −128: the accumulator the integer conv
    computes is exactly the bound the lower pass checks against int32, on both targets."""
    layer = ReferenceConv2d(channels, 2, (kernel, kernel), (1, 1), (0, 0), (1, 1), 1, False,
                            act_bits)
    layer.weight_codes.fill_(-128)
    qmax = 2 ** act_bits - 1
    layer.input_zero_point.fill_(qmax if low else 0)  # all codes 0 (q − z = −qmax) or qmax
    codes = torch.full((1, channels, kernel, kernel), 0 if low else qmax, dtype=torch.uint8)
    acc, window_sum = layer.integer_accumulators(codes)
    bound = accumulator_bound(channels * kernel * kernel, act_bits)
    assert window_sum is None and int(acc.abs().max()) == bound
    cpu = CpuConv2d(*_shape_args(layer))
    cpu.load_state_dict(layer.state_dict(), strict=False)
    assert float(cpu(codes).abs().max()) == bound  # below 2^24 here: exact in float32


def test_the_bound_keeps_int32_up_to_the_documented_fan_in():
    assert accumulator_bound(65_793, 8) <= INT32_MAX < accumulator_bound(65_794, 8)
    assert accumulator_bound(7_310 * 9, 8) <= INT32_MAX  # a 3×3 conv of 7 310 channels


def test_onednn_rejects_leaky_relu_as_a_fused_post_op():
    """Why IMDN's and PAN's leaky-ReLU convs keep float32 outputs (docs/lowering.md)."""
    weight = torch.ones(4, 4, 1, 1, dtype=torch.int8)
    scales = torch.ones(4)
    packed = torch.ops.onednn.qconv_prepack(weight, scales, 1.0, 0, [1, 1], [0, 0], [1, 1], 1,
                                            None)
    codes = torch.zeros(1, 4, 2, 2, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    args = (codes, 1.0, 0, packed, scales, torch.zeros(4, dtype=torch.int64), None, [1, 1],
            [0, 0], [1, 1], 1, 1.0, 0, torch.uint8)
    assert torch.ops.onednn.qconv_pointwise(*args, "relu", [None], "").dtype == torch.uint8
    with pytest.raises(RuntimeError, match="leaky_relu"):
        torch.ops.onednn.qconv_pointwise(*args, "leaky_relu", [0.05], "")


def test_worst_case_accumulator_is_exact_on_both_targets():
    layer = ReferenceConv2d(64, 2, (3, 3), (1, 1), (0, 0), (1, 1), 1, False, 8)
    layer.weight_codes.fill_(-128)
    layer.input_zero_point.fill_(255)  # every code 0: q − z = −255 everywhere
    codes = torch.zeros((1, 64, 3, 3), dtype=torch.uint8)
    acc, window_sum = layer.integer_accumulators(codes)
    assert window_sum is None and int(acc.max()) == accumulator_bound(64 * 9, 8)
    cpu = CpuConv2d(*_shape_args(layer))
    cpu.load_state_dict(layer.state_dict(), strict=False)
    assert torch.equal(cpu(codes), acc.float())  # 18 800 640 < 2^24: exact in float32


def test_centring_keeps_every_code_in_int8():
    k = torch.tensor([[8, 263], [-100, 100], [-128, 127], [0, 15]])
    codes, centre = centre_codes(k)
    assert codes.dtype == torch.int8
    assert torch.equal(codes.long() + centre.view(-1, 1), k)
    assert centre.tolist() == [136, 0, 0, 0]
    with pytest.raises(LoweringError, match="more than 256 levels"):
        centre_codes(torch.tensor([[0, 256]]))
