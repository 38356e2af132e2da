"""The quantizer contract: every quantizer's integer form gives back its fake-quant values,
and the one mode switch does what it says for every kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.quant import QUANT_MODES, AffineCodes, CodebookCodes, UniformQuantizer, quant_mode
from fxquant.quant.daq import DAQActivationQuantizer, daq_codes
from fxquant.quant.daq_weights import DAQWeightQuantizer
from fxquant.quant.subset import SubsetQuantizer
from fxquant.quant.uniform import affine_qparams

pytestmark = pytest.mark.usefixtures("one_thread")

tensors = st.tuples(st.integers(0, 10_000), st.integers(1, 3), st.integers(1, 5),
                    st.floats(0.01, 100.0))


def _x(seed, n, c, spread, relu=False):
    torch.manual_seed(seed)
    x = torch.randn(n, c, 6, 5) * spread + spread / 3
    return torch.relu(x) if relu else x


def _uniform(bits, x):
    q = UniformQuantizer(bits)
    q.set_qparams(*affine_qparams(x.min() * 0.7, x.max() * 0.7, bits))
    return q


@settings(max_examples=40, deadline=None)
@given(tensors, st.integers(2, 8))
def test_uniform_codes_are_exact(case, bits):
    seed, n, c, spread = case
    x = _x(seed, n, c, spread)
    q = _uniform(bits, x)
    codes = q.integer_codes(x)
    assert isinstance(codes, AffineCodes) and codes.codes.dtype == torch.int32
    assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) <= 2 ** bits - 1
    assert torch.equal(codes.dequantize(), q.fake_quant(x))


@settings(max_examples=40, deadline=None)
@given(tensors, st.integers(2, 8), st.sampled_from(["signed", "relu", "relu-clipped"]),
       st.sampled_from([0, 4]))
def test_daq_codes_give_back_the_fake_quant_values(case, bits, branch, qq_bits):
    seed, n, c, spread = case
    x = _x(seed, n, c, spread, relu=branch != "signed")
    q = DAQActivationQuantizer(c, bits, branch=branch, qq_bits=qq_bits)
    codes = q.integer_codes(x)
    assert not codes.codes.is_floating_point()
    assert codes.scale.shape == (n, c, 1, 1)  # per (image, channel)
    torch.testing.assert_close(codes.dequantize(), q.fake_quant(x), rtol=0, atol=0)
    if branch == "signed":  # 2^b mid-rise levels: codes −2^(b−1)+1 .. 2^(b−1)
        assert int(codes.codes.min()) >= 1 - 2 ** (bits - 1)
        assert int(codes.codes.max()) <= 2 ** (bits - 1)


def test_daq_initial_branch_has_no_integer_form():
    with pytest.raises(ValueError, match="relu-initial.*no integer form"):
        daq_codes(torch.rand(1, 2, 4, 4), 4, branch="relu-initial")


@settings(max_examples=25, deadline=None)
@given(tensors, st.integers(2, 8))
def test_daq_weight_codes(case, bits):
    seed, _, c, spread = case
    torch.manual_seed(seed)
    w = torch.randn(4, c, 3, 3) * spread
    q = DAQWeightQuantizer(w.shape, bits, granularity="per-channel")
    codes = q.integer_codes(w)
    assert torch.equal(codes.dequantize(), q.fake_quant(w))
    assert int(codes.codes.abs().max()) <= 2 ** (bits - 1)


@settings(max_examples=25, deadline=None)
@given(tensors, st.integers(2, 4), st.sampled_from(["dynamic", "static"]), st.booleans())
def test_subset_codes_index_the_channel_points(case, bits, mode, post_relu):
    seed, n, c, spread = case
    x = _x(seed, n, c, spread, relu=post_relu)
    q = SubsetQuantizer(bits, c, post_relu=post_relu, mode=mode)
    if mode == "static":
        q.set_scale(x.abs().amax(dim=(0, 2, 3)) + 1e-3)
    codes = q.integer_codes(x)
    assert isinstance(codes, CodebookCodes)
    assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) < 2 ** bits
    torch.testing.assert_close(codes.dequantize(), q.fake_quant(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda x: _uniform(4, x),
    lambda x: DAQActivationQuantizer(x.shape[1], 3),
    lambda x: SubsetQuantizer(3, x.shape[1]),
])
def test_one_mode_switch_for_every_kind(make):
    x = _x(0, 2, 3, 2.0)
    q = make(x)
    assert q.quant_mode == "fake-quant" and set(QUANT_MODES) == {"fake-quant", "observe", "off"}
    assert not torch.equal(q(x), x)
    with quant_mode(q, "off") as switched:
        assert switched == [""]
        assert torch.equal(q(x), x)
    with quant_mode(q, "observe"):
        assert torch.equal(q(x), x)
        assert torch.equal(q(x * 2), x * 2)
    lo, hi = q.observed_range
    assert float(lo) == float(torch.minimum(x.min(), (2 * x).min()))
    assert float(hi) == float(torch.maximum(x.max(), (2 * x).max()))
    assert q.quant_mode == "fake-quant"
    with pytest.raises(ValueError, match="mode 'train' unknown; valid: fake-quant, observe, off"):
        with quant_mode(q, "train"):
            pass
