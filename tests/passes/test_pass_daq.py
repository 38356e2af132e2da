"""``daq`` / ``daq-sensitivity``: structure (golden), post-ReLU detection, SQNR bounds, QAT
gradients, mixed precision, save/load, recipe errors, and (slow) DAQ vs uniform on IMDN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant import PassContext, PassManager, Recipe, RecipeError, compile
from fxquant.inspect import graph_table
from fxquant.metrics import sqnr_db
from fxquant.observers import Observer
from fxquant.quant import QuantConv2d
from fxquant.quant.daq import DAQActivationQuantizer
from fxquant.quant.daq_weights import DAQWeightQuantizer
from fxquant.quant.daq_mixed import DAQSensitivityObserver

pytestmark = pytest.mark.usefixtures("one_thread")


def _daq(bits: int, **options) -> dict:
    return {"method": "daq", "weights": {"bits": bits}, "activations": {"bits": bits},
            "options": options}


def _x():
    return torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def _act_quantizers(gm):
    return {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DAQActivationQuantizer)}


def test_daq_structure(tiny_sr, golden):
    gm = compile(tiny_sr, "daq-w4a4")
    golden("tiny_sr.daq.txt", graph_table(gm))
    quant_convs = sorted(n for n, m in gm.named_modules() if isinstance(m, QuantConv2d))
    assert quant_convs == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert all(isinstance(gm.get_submodule(n).weight_quantizer, DAQWeightQuantizer)
               for n in quant_convs)
    assert type(gm.get_submodule("head")) is nn.Conv2d and type(gm.get_submodule("tail")) is nn.Conv2d
    history = dict(gm.fxquant_history)
    assert history["calibrate"] == {"batches": 0}  # plain DAQ needs no data
    assert history["daq"]["post_relu"] == 2


def test_post_relu_inputs_take_the_relu_branch_from_the_graph(tiny_sr):
    quantizers = _act_quantizers(compile(tiny_sr, "daq-w4a4"))
    branches = {name: q.branch for name, q in quantizers.items()}
    assert branches == {"blocks_0_0_input_quantizer": "signed",   # head output (signed)
                        "blocks_0_2_input_quantizer": "relu",     # after ReLU
                        "blocks_1_0_input_quantizer": "signed",
                        "blocks_1_2_input_quantizer": "relu"}
    clipped = _act_quantizers(compile(tiny_sr, _daq(4, post_relu="clipped")))
    assert clipped["blocks_0_2_input_quantizer"].branch == "relu-clipped"
    off = _act_quantizers(compile(tiny_sr, _daq(4, post_relu="off")))
    assert {q.branch for q in off.values()} == {"signed"}


@pytest.mark.parametrize("bits, floor_db", [(8, 38.0), (6, 30.0), (4, 20.0)])
def test_daq_output_sqnr_floor(tiny_sr, bits, floor_db):
    gm = compile(tiny_sr, _daq(bits))
    with torch.no_grad():
        assert sqnr_db(tiny_sr(_x()), gm(_x())) > floor_db


def test_more_bits_means_closer_to_float(tiny_sr):
    with torch.no_grad():
        sqnrs = [sqnr_db(tiny_sr(_x()), compile(tiny_sr, _daq(b))(_x())) for b in (2, 3, 4, 6, 8)]
    assert sqnrs == sorted(sqnrs)


def test_pass_options_override_recipe_bits(tiny_sr):
    ctx = PassContext(Recipe.from_dict(_daq(8)))
    gm = PassManager("trace,daq{w=3,a=5}").run(tiny_sr, ctx)
    assert {q.describe()["bits"] for q in _act_quantizers(gm).values()} == {5}
    assert gm.get_submodule("blocks.0.0").weight_quantizer.describe()["bits"] == 3


def test_gradients_flow_for_quantization_aware_training(tiny_sr):
    gm = compile(tiny_sr, "daq-w4a4")
    gm.train()
    loss = (gm(_x()) - tiny_sr(_x()).detach()).abs().mean()
    loss.backward()
    for name in ("blocks.0.0", "blocks.1.2", "head"):
        grad = gm.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


class SharedConv(nn.Module):
    """A conv applied twice (as CARN-M's cascading blocks reuse their residual block)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = self.shared(torch.relu(self.shared(h)))
        return self.tail(h)


def test_a_conv_called_twice_gets_two_input_quantizers_and_one_weight_quantizer():
    torch.manual_seed(0)
    model = SharedConv().eval()
    gm = compile(model, _daq(4))
    assert sorted(q.branch for q in _act_quantizers(gm).values()) == ["relu", "signed"]
    assert isinstance(gm.get_submodule("shared"), QuantConv2d)
    calib = torch.rand(8, 3, 10, 10)
    mixed = compile(model, _daq(3, mixed_precision=True), calib=calib)
    bits = [q.bits for q in _act_quantizers(mixed).values()]
    assert torch.equal(bits[0], bits[1])  # one allocation per conv, summed over its calls
    assert torch.equal(mixed.get_submodule("shared").weight_quantizer.bits[:, :, 0, 0],
                       bits[0].expand(8, 8))


def test_mixed_precision_structure_and_budget(tiny_sr, calib, golden):
    gm = compile(tiny_sr, "daq-mp3", calib=calib)
    golden("tiny_sr.daq_mp.txt", graph_table(gm))
    assert not any(isinstance(m, Observer) for m in gm.modules())
    history = dict(gm.fxquant_history)
    assert history["daq-sensitivity"]["observed"] == 4
    assert history["calibrate"]["batches"] == 2
    assert 2.9 < history["daq"]["avg_bits_per_mac"] <= 3.0  # network budget per MAC
    for name, quantizer in _act_quantizers(gm).items():
        assert set(quantizer.bits.tolist()) <= {2, 3, 4}
        node = next(n for n in gm.graph.nodes if n.target == name)
        conv = gm.get_submodule(next(iter(node.users)).target)
        assert torch.equal(conv.weight_quantizer.bits[:, :, 0, 0], quantizer.bits.expand(8, 8))
    with torch.no_grad():
        assert sqnr_db(tiny_sr(_x()), gm(_x())) > 15.0


def test_mixed_precision_per_layer_meets_the_budget_in_every_layer(tiny_sr, calib):
    gm = compile(tiny_sr, _daq(3, mixed_precision=True, mp_scope="layer"), calib=calib)
    for quantizer in _act_quantizers(gm).values():
        assert quantizer.bits.double().mean() == 3.0


def test_mixed_precision_with_one_choice_is_uniform_daq(tiny_sr, calib):
    uniform = compile(tiny_sr, _daq(3))
    single = compile(tiny_sr, _daq(3, mixed_precision=True, mp_bits=[3], mp_avg_bits=3.0),
                     calib=calib)
    with torch.no_grad():
        assert torch.equal(uniform(_x()), single(_x()))


def test_sensitivity_observers_are_identities(tiny_sr, calib):
    ctx = PassContext(Recipe.from_dict(_daq(3, mixed_precision=True)), calib=calib)
    gm = PassManager("trace,daq-sensitivity").run(tiny_sr, ctx)
    observers = [m for m in gm.modules() if isinstance(m, DAQSensitivityObserver)]
    assert len(observers) == 4
    with torch.no_grad():
        assert torch.equal(gm(_x()), tiny_sr(_x()))
    assert observers[0].errors.shape == (3, 8)
    assert (observers[0].errors[0] >= observers[0].errors[-1]).all()  # 2 bits worse than 4


def test_mixed_precision_network_scope_meets_the_global_budget(tiny_sr, calib):
    gm = compile(tiny_sr, _daq(3, mixed_precision=True, mp_scope="network", mp_budget="channel",
                               mp_weights="fixed"), calib=calib)
    bits = torch.cat([q.bits for q in _act_quantizers(gm).values()])
    assert bits.double().mean() == 3.0
    assert gm.get_submodule("blocks.0.0").weight_quantizer.describe()["bits"] == 3


def test_mixed_precision_model_saves_and_loads(tiny_sr, calib, tmp_path):
    gm = compile(tiny_sr, "daq-mp3", calib=calib)
    fxquant.save(gm, tmp_path / "m.fxq")
    fresh = type(tiny_sr)()
    loaded = fxquant.load(tmp_path / "m.fxq", fresh)
    with torch.no_grad():
        assert torch.equal(loaded(_x()), gm(_x()))
    assert graph_table(loaded) == graph_table(gm)


def test_mixed_precision_without_data_names_the_problem(tiny_sr):
    with pytest.raises(fxquant.CalibrationError, match="no calibration data"):
        compile(tiny_sr, "daq-mp3")


@pytest.mark.parametrize("options, message", [
    ({"post_relu": "maybe"}, "unclipped, clipped, initial, off"),
    ({"step_index": "tail"}, "head, initial"),
    ({"qq_bits": 12}, "2..8"),
    ({"mp_bits": [4, 2]}, "ascending"),
    ({"mp_avg_bits": 5.0}, r"\[2, 4\]"),
    ({"mp_scope": "global"}, "network, layer"),
    ({"mp_budget": "bitops"}, "mac, channel"),
    ({"weight_granularity": "per-kernel"}, "per-tensor, per-channel"),
    ({"mp_weighting": "hessian"}, "downstream-dc, downstream, none"),
])
def test_bad_options_name_valid_choices(options, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(_daq(4, **options))


def test_bits_outside_the_step_table_are_rejected(tiny_sr):
    with pytest.raises(RecipeError, match="2..8"):
        compile(tiny_sr, _daq(10))


def test_presets_load():
    names = [n for n in fxquant.available_presets() if n.startswith("daq-")]
    assert {"daq-w4a4", "daq-w3a3", "daq-w2a2", "daq-w4a4qq4", "daq-mp3", "daq-mp4"} <= set(names)
    for name in names:
        recipe = fxquant.load_preset(name)
        assert recipe.method == "daq" and recipe.name == name
    assert fxquant.load_preset("daq-mp3").options.mixed_precision


@pytest.mark.slow
@pytest.mark.data
def test_daq_w4a4_beats_uniform_minmax_on_imdn(data):
    from fxquant.data import BenchmarkSet, calibration_patches
    from fxquant.evaluate import evaluate
    from fxquant.models import build_model

    images = BenchmarkSet("Set5", 4, root=data, limit=2)
    calib = calibration_patches(16, 48, 4, root=data)
    scores = {}
    for recipe in ("daq-w4a4", "minmax-w4a4"):
        model = compile(build_model("imdn", 4, pretrained=True, data_root=data), recipe,
                        calib=calib)
        scores[recipe] = evaluate(model, images, "rgb").psnr
    assert scores["daq-w4a4"] > scores["minmax-w4a4"] + 1.0
