"""ODM v2's weight-clipping correction: the range is the percentile of |W| times a learnable
γ, follows the weights, trains γ through the straight-through rounding, and lowers."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.quant import QuantConv2d
from fxquant.quant.wcc import ClippedWeightQuantizer


def test_the_range_is_the_percentile_of_abs_w_times_gamma():
    w = torch.linspace(-1, 1, 201).view(1, 201, 1, 1)
    q = ClippedWeightQuantizer(4, percentile=90.0)
    with torch.no_grad():
        q.gamma.fill_(0.5)
    top = float(torch.quantile(w.abs().flatten(), 0.9)) * 0.5
    out = q.fake_quant(w).detach()
    assert float(out.max()) == pytest.approx(top, rel=1e-6)
    assert float(out.min()) == pytest.approx(-top, rel=1e-6)
    assert len(out.unique()) == 15  # ±7 levels and 0


def test_gamma_learns_through_the_rounding():
    q = ClippedWeightQuantizer(3)
    with torch.no_grad():
        q.gamma.fill_(0.3)  # most weights clipped
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    loss = ((q.fake_quant(w) - w) ** 2).sum()  # wants a wider range
    loss.backward()
    assert q.gamma.grad is not None and float(q.gamma.grad) < 0


def test_integer_codes_round_trip_the_fake_quant():
    q = ClippedWeightQuantizer(4)
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(1))
    codes = q.integer_codes(w)
    assert torch.equal((codes.codes.float() * codes.scale), q.fake_quant(w).detach())
    assert int(codes.codes.abs().max()) <= 7


def test_the_wcc_pass_swaps_every_quantized_conv_and_lowers(tiny_sr):
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    gm = fxquant.compile(tiny_sr, "mse-w4a4", calib=calib,
                         pipeline="trace,observe,calibrate,quantize,wcc,verify")
    convs = [m for m in gm.modules() if isinstance(m, QuantConv2d)]
    assert convs and all(isinstance(c.weight_quantizer, ClippedWeightQuantizer) for c in convs)
    assert all(c.weight_quantizer.bits == 4 for c in convs)
    lowered = fxquant.lowered_copy(gm, "reference")
    x = torch.rand(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(lowered(x), gm(x), atol=1e-4)


def test_wcc_needs_quantized_convs(tiny_sr):
    with pytest.raises(fxquant.FxquantError, match="put 'wcc' after 'quantize'"):
        fxquant.compile(tiny_sr, "mse-w4a4", calib=torch.rand(4, 3, 16, 16),
                        pipeline="trace,wcc", allow_unquantized=True)
