"""Learned step multipliers of DAQ and DFSQ: 1 is the method's own quantizer bit for bit, any
value keeps fake-quant, integer codes and the lowered conv in agreement (DFSQ's codes: the
hypothesis test in tests/lower/test_dfsq_lowering.py), the multiplier gets a step gradient,
and the ``reconstruct`` pass trains it on DAQ and DFSQ pipelines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.errors import PassError
from fxquant.lower.daq import DaqQuantize
from fxquant.quant.base import MIN_MULTIPLIER
from fxquant.quant.daq import DAQActivationQuantizer, daq_quantize
from fxquant.quant.daq_weights import DAQWeightQuantizer, daq_weight_quantize
from fxquant.quant.subset import SubsetQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

DFSQ_RECON = ("trace,dfsq-observe,calibrate,subset-quant,fold-channel-norm,"
              "reconstruct{steps=30,eval_every=10,patience=10},verify")
DAQ_RECON = "trace,daq-sensitivity,calibrate,daq,reconstruct{steps=30,eval_every=10,patience=10},verify"


def _input(seed: int, shape=(2, 3, 6, 7), relu: bool = False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3
    return x.clamp(min=0) if relu else x


@pytest.mark.parametrize("branch", ["signed", "relu", "relu-clipped", "relu-initial"])
def test_unit_multipliers_are_the_official_quantizer_bit_for_bit(branch):
    x = _input(0, relu=branch != "signed")
    q = DAQActivationQuantizer(3, 4, branch=branch)
    assert torch.equal(q.fake_quant(x), daq_quantize(x, 4, branch=branch))
    q.trainable_parameters()  # a Parameter now: same value, gradient path added
    assert torch.equal(q.fake_quant(x), daq_quantize(x, 4, branch=branch))
    w = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    wq = DAQWeightQuantizer(w.shape, 4, granularity="per-channel")
    wq.trainable_parameters()
    assert torch.equal(wq.fake_quant(w), daq_weight_quantize(w, 4, granularity="per-channel"))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8),
       branch=st.sampled_from(["signed", "relu", "relu-clipped"]),
       gammas=st.lists(st.floats(0.2, 3.0), min_size=3, max_size=3))
def test_scaled_steps_keep_codes_and_fake_quant_in_agreement(seed, bits, branch, gammas):
    x = _input(seed, relu=branch != "signed")
    q = DAQActivationQuantizer(3, bits, branch=branch)
    q.step_multiplier.copy_(torch.tensor(gammas))
    fake = q.fake_quant(x)
    torch.testing.assert_close(q.integer_codes(x).dequantize(), fake, rtol=0, atol=1e-5)
    codes, step, offset, _ = DaqQuantize.from_quantizer(q, channels_last=False)(x)
    torch.testing.assert_close(codes.double() * step.double() + offset.double(), fake.double(),
                               rtol=0, atol=1e-5)
    # the step of channel c is γ_c times the official one
    base = DAQActivationQuantizer(3, bits, branch=branch).integer_codes(x).scale
    torch.testing.assert_close(q.integer_codes(x).scale,
                               base * torch.tensor(gammas).view(1, 3, 1, 1))


def test_the_multiplier_gets_lsq_step_gradient():
    """∂Σx̂/∂γ = Δ₀·Σ(round(x_n) − x_n) inside the grid, ±h·Δ₀ where clipped (signed)."""
    x = _input(3, shape=(1, 1, 8, 8)) * 3
    x[0, 0, 0, :3] = torch.tensor([30.0, -25.0, 40.0])  # outliers beyond the clip
    q = DAQActivationQuantizer(1, 2, branch="signed")
    (gamma,) = q.trainable_parameters()
    x.requires_grad_(True)
    out = q.fake_quant(x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the official identity STE, unchanged
    codes = q.integer_codes(x.detach())
    step, mu = codes.scale, codes.offset
    xn = (x.detach() - mu) / step
    levels = codes.dequantize()
    r = (levels - mu) / step
    inside = (levels - x.detach()).abs() <= step / 2
    expected = (torch.where(inside, r - xn, r) * step).sum()  # γ = 1: Δ₀ = Δ
    assert bool((~inside).any()) and bool(inside.any())
    torch.testing.assert_close(gamma.grad, expected.reshape(1), rtol=1e-5, atol=1e-5)


def test_constrain_check_and_state_dicts_from_before_multipliers():
    q = DAQActivationQuantizer(3, 4)
    (gamma,) = q.trainable_parameters()
    with torch.no_grad():
        gamma.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    with pytest.raises(ValueError, match="step multipliers must be finite and > 0"):
        q.check()
    q.constrain()
    assert gamma.tolist() == pytest.approx([MIN_MULTIPLIER, 0.5, 2.0])
    q.check()
    assert q.describe()["step_multiplier"] == "0.001-2"
    old = {k: v for k, v in DAQActivationQuantizer(3, 4).state_dict().items()
           if k != "step_multiplier"}
    fresh = DAQActivationQuantizer(3, 4)
    fresh.load_state_dict(old)  # strict: the missing multipliers are the official 1
    assert torch.equal(fresh.step_multiplier, torch.ones(3))
    assert "step_multiplier" not in fresh.describe()
    lowered = DaqQuantize(3, "signed", 0, "head", channels_last=False)
    lowered.load_state_dict({k: v for k, v in lowered.state_dict().items()
                             if k != "step_multiplier"})


def test_reconstruct_trains_daq_multipliers_and_the_result_lowers(tiny_sr, calib):
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    gm = fxquant.compile(tiny_sr, "daq-w3a3", calib=calib, pipeline=DAQ_RECON)
    info = dict(gm.fxquant_history)["reconstruct{steps=30,eval_every=10,patience=10}"]
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    daq = [m for m in gm.modules() if isinstance(m, (DAQActivationQuantizer, DAQWeightQuantizer))]
    assert daq and info["parameters"] == sum(m.step_multiplier.numel() for m in daq)
    assert any(not torch.equal(m.step_multiplier, torch.ones_like(m.step_multiplier))
               for m in daq)
    assert all(not m.step_multiplier.requires_grad for m in daq)  # static again
    assert all(torch.equal(v, before[k]) for k, v in tiny_sr.state_dict().items())
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(4))
    lowered = fxquant.lowered_copy(gm, "reference")
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=0, atol=1e-4)


def test_saved_daq_reconstruction_loads_identically(tiny_sr, calib, tmp_path):
    gm = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib, pipeline=DAQ_RECON)
    fxquant.save(gm, tmp_path / "d.fxq")
    loaded = fxquant.load(tmp_path / "d.fxq", model=type(tiny_sr)().eval())
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_reconstruct_without_ranges_on_daq_has_nothing_to_train(tiny_sr, calib):
    with pytest.raises(PassError, match="nothing to train.*daq"):
        fxquant.compile(tiny_sr, "daq-w4a4", calib=calib, pipeline=DAQ_RECON.replace(
            "patience=10}", "patience=10,ranges=false}"))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_dfsq_unit_multipliers_are_dfsq_and_others_scale_its_steps(mode):
    q = SubsetQuantizer(3, 2, mode=mode)
    q.set_points(torch.tensor([[-1.0, -0.5, -0.25, 0.0, 0.125, 0.25, 0.5, 1.0]] * 2))
    if mode == "static":
        q.set_scale(torch.tensor([2.0, 0.5]))
    x = _input(5, shape=(2, 2, 6, 6))
    official = q.fake_quant(x)
    q.trainable_parameters()
    with torch.no_grad():
        assert torch.equal(q.fake_quant(x), official)
        q.step_multiplier.copy_(torch.tensor([2.0, 1.0]))
        doubled = q.fake_quant(x)
    # channel 0 now spans twice the range with the same points: its level spacing doubles
    assert torch.equal(doubled[:, 1], official[:, 1])
    assert not torch.equal(doubled[:, 0], official[:, 0])
    with torch.no_grad():
        _, scale, _ = q._normalize(x)
        q.step_multiplier.fill_(1.0)
        _, unit_scale, _ = q._normalize(x)
        q.step_multiplier.copy_(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(scale[:, 0], 2 * unit_scale[:, 0], rtol=0, atol=0)  # carries γ
    codes = q.integer_codes(x)
    torch.testing.assert_close(codes.dequantize(), doubled, rtol=0, atol=1e-6)


def test_dfsq_multiplier_gets_a_gradient_and_reconstruct_trains_it(tiny_sr, calib):
    q = SubsetQuantizer(2, 1)
    q.set_points(torch.tensor([[-1.0, -0.25, 0.25, 1.0]]))
    (gamma,) = q.trainable_parameters()
    q.fake_quant(_input(6, shape=(1, 1, 8, 8))).pow(2).sum().backward()
    assert gamma.grad is not None and bool(torch.isfinite(gamma.grad).all())
    assert float(gamma.grad.abs()) > 0

    gm = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib, pipeline=DFSQ_RECON)
    info = dict(gm.fxquant_history)["reconstruct{steps=30,eval_every=10,patience=10}"]
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    subsets = [m for m in gm.modules() if isinstance(m, SubsetQuantizer)]
    assert subsets and any(not torch.equal(m.step_multiplier, torch.ones_like(m.step_multiplier))
                           for m in subsets)
    for m in subsets:
        m.check()
    x = calib[:2]
    with torch.no_grad():
        expected = gm(x)
        out = fxquant.lowered_copy(gm, "reference")(x)
    assert float((out - expected).abs().max() / expected.abs().max()) < 1e-3
