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


def test_first_last_bits_quantize_the_head_and_tail_at_their_own_width(tiny_sr, calib):
    """A 4-bit body with an 8-bit head and tail: every conv is quantized (and lowers)."""
    from fxquant import lowered_copy

    recipe = {"weights": {"bits": 4}, "activations": {"bits": 4},
              "layers": {"first_last_bits": 8}}
    gm = compile(tiny_sr, recipe, calib=calib)
    convs = {n: m for n, m in gm.named_modules() if isinstance(m, QuantConv2d)}
    assert {n: m.weight_quantizer.bits for n, m in convs.items()} == {
        "head": 8, "blocks.0.0": 4, "blocks.0.2": 4, "blocks.1.0": 4, "blocks.1.2": 4, "tail": 8}
    assert gm.get_submodule("head_input_quantizer").bits == 8
    assert gm.get_submodule("tail_input_quantizer").bits == 8
    assert dict(gm.fxquant_history)["quantize"]["layer_bits"] == {"head": 8, "tail": 8}
    # TinySR's only tail conv is its last: an 8-bit tail changes nothing, and the history says so
    tail_only = compile(tiny_sr, {**recipe, "layers": {"tail_bits": 8}}, calib=calib)
    assert dict(tail_only.fxquant_history)["quantize"]["layer_bits"] == {}
    plain = compile(tiny_sr, {**recipe, "layers": {}}, calib=calib)
    assert {n for n, m in plain.named_modules() if isinstance(m, QuantConv2d)} == \
        set(convs) - {"head", "tail"}
    lowered = lowered_copy(gm, "cpu")
    assert not any(isinstance(m, torch.nn.Conv2d) for m in lowered.modules())
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(lowered(x), gm(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers, method, message", [
    ({"first_last_bits": 8, "keep_first_last": False}, "uniform",
     "first_last_bits = 8 needs layers.keep_first_last = true"),
    ({"first_last_bits": 1}, "uniform", r"first_last_bits = 1 is impossible"),
    ({"first_last_bits": 8}, "daq", "first_last_bits applies to the quantize and "
                                    "nonuniform-quant passes .methods uniform, odm, i2nq., not "
                                    "to method 'daq'"),
    ({"tail_bits": 8}, "dfsq", "tail_bits applies to the quantize and nonuniform-quant passes"),
    ({"tail_bits": 17}, "uniform", r"tail_bits = 17 is impossible"),
    ({"tail_bits": True}, "i2nq", r"tail_bits"),
])
def test_first_last_bits_errors(layers, method, message):
    from fxquant.errors import RecipeError

    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"method": method, "layers": layers})


def test_a_new_recipe_field_at_its_neutral_default_keeps_stored_fingerprints():
    from fxquant.results_store import recipe_hash

    # the fingerprints docs/results/uniform.json and daq.json hold for these presets
    assert (recipe_hash("mse-w4a4"), recipe_hash("daq-w4a4")) == ("ebd254b4a431b8ab",
                                                                  "92099d5f602bd0f4")
