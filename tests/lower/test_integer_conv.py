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
@given(st.sampled_from([1, 3, 5, 7]), st.integers(1, 4096), st.integers(2, 8))
def test_accumulator_bound_holds_on_the_worst_input(kernel, channels, act_bits):
    """The worst case (every code at its extreme, every weight −128) reaches the bound
    exactly; the bound is what the lower pass checks against int32."""
    fan_in = channels * kernel * kernel
    worst = fan_in * (2 ** act_bits - 1) * 128  # |q − z| <= 2^a − 1, |k − c| <= 128
    assert accumulator_bound(fan_in, act_bits) == worst
    # every supported layer (fan-in up to 65 793 at 8 bits) fits int32
    assert (accumulator_bound(fan_in, act_bits) <= INT32_MAX) == (worst <= INT32_MAX)
    if kernel == 3 and channels <= 4096:
        assert accumulator_bound(fan_in, 8) <= INT32_MAX


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
