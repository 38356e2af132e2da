"""``quantize``: structure (golden) and SQNR bounds for the lossy substitution."""

from __future__ import annotations

import pytest
import torch

from fxquant import PassContext, PassManager, Recipe, compile
from fxquant.inspect import graph_table
from fxquant.metrics import sqnr_db
from fxquant.observers import Observer
from fxquant.quant import QuantConv2d, UniformQuantizer


def test_quantize_structure(tiny_sr, calib, golden):
    gm = compile(tiny_sr, "minmax-w4a4", calib=calib)
    golden("tiny_sr.quantize.txt", graph_table(gm))
    assert not any(isinstance(m, Observer) for m in gm.modules())
    quant_convs = sorted(n for n, m in gm.named_modules() if isinstance(m, QuantConv2d))
    assert quant_convs == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert type(gm.get_submodule("head")) is torch.nn.Conv2d
    assert type(gm.get_submodule("tail")) is torch.nn.Conv2d


@pytest.mark.parametrize("recipe, floor_db", [
    ("minmax-w8a8", 35.0), ("minmax-w6a6", 25.0), ("minmax-w4a4", 13.0),
    ("percentile-w4a4", 13.0), ("mse-w4a4", 14.0),
])
def test_quantized_output_sqnr_floor(tiny_sr, calib, recipe, floor_db):
    gm = compile(tiny_sr, recipe, calib=calib)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert sqnr_db(tiny_sr(x), gm(x)) > floor_db


def test_more_bits_means_less_error(tiny_sr, calib):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        errs = [sqnr_db(tiny_sr(x), compile(tiny_sr, {"weights": {"bits": b}, "activations": {"bits": b}},
                                            calib=calib)(x)) for b in (3, 4, 6, 8)]
    assert errs == sorted(errs)


def test_activation_quantizer_range_comes_from_the_observer(tiny_sr, calib):
    gm = compile(tiny_sr, "minmax-w8a8", calib=calib)
    quantizer = gm.get_submodule("blocks_0_0_input_quantizer")
    head_out = tiny_sr.head(calib).detach()
    lo, hi = float(head_out.min()), float(head_out.max())
    assert float(quantizer.scale) == pytest.approx((hi - lo) / 255, rel=1e-5)
    assert float((0 - quantizer.zero_point) * quantizer.scale) == pytest.approx(lo, abs=quantizer.scale.item())


def test_weight_quantizer_is_per_output_channel(tiny_sr, calib):
    gm = compile(tiny_sr, "minmax-w4a4", calib=calib)
    conv = gm.get_submodule("blocks.0.0")
    assert conv.weight_quantizer.scale.shape == (8, 1, 1, 1)
    q = conv.weight_quantizer(conv.weight)
    for o in range(8):
        assert torch.unique(q[o]).numel() <= 16
    # the compiled model owns a copy of the weights (same values, same state_dict keys)
    assert conv.weight is not tiny_sr.blocks[0][0].weight
    torch.testing.assert_close(conv.weight, tiny_sr.blocks[0][0].weight, rtol=0, atol=0)
    assert "blocks.0.0.weight" in gm.state_dict()


def test_pass_options_override_recipe_bits(tiny_sr, calib):
    ctx = PassContext(Recipe(), calib=calib)
    gm = PassManager("trace,observe,calibrate,quantize{w=3,a=5}").run(tiny_sr, ctx)
    quantizers = [m for m in gm.modules() if isinstance(m, UniformQuantizer)]
    assert {q.bits for q in quantizers} == {3, 5}


def test_symmetric_weights_and_per_channel_activations(tiny_sr, calib):
    recipe = {"weights": {"observer": "symmetric"}, "activations": {"granularity": "per-channel"}}
    gm = compile(tiny_sr, recipe, calib=calib)
    assert gm.get_submodule("blocks.0.0").weight_quantizer.symmetric
    assert gm.get_submodule("blocks_0_0_input_quantizer").scale.shape == (1, 8, 1, 1)
    x = torch.rand(2, 3, 12, 12)
    with torch.no_grad():
        assert sqnr_db(tiny_sr(x), gm(x)) > 30
