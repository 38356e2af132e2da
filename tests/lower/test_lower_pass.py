"""The ``lower`` pass: graph structure, whole-model agreement between targets, the lowered
state through save/load, and the errors it gives instead of silent garbage."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import fxquant
from fxquant.errors import PassError, RecipeError
from fxquant.lower import CpuConv2d, InputGuard, IntegerQuantize, LoweringError, ReferenceConv2d
from fxquant.lower.compare import layer_agreement
from fxquant.quant import UniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

UNIFORM = "trace,observe,calibrate,quantize"


def lowered(model, calib, recipe="minmax-w8a8", target="reference", extra=""):
    return fxquant.compile(model, recipe, calib=calib,
                           pipeline=f"{UNIFORM},lower{{target={target}{extra}}},verify")


@pytest.mark.parametrize("target,cls", [("reference", ReferenceConv2d), ("cpu", CpuConv2d)])
def test_structure_every_quantized_conv_is_integer(tiny_sr, calib, target, cls):
    gm = lowered(tiny_sr, calib, target=target)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
             if n.op == "call_module"]
    # guard, float head, 2 blocks of (codes, int conv, ReLU, codes, int conv), float tail
    block = ["IntegerQuantize", cls.__name__, "ReLU", "IntegerQuantize", cls.__name__]
    assert kinds == ["InputGuard", "Conv2d", *block, *block, "Conv2d"]
    codes = gm.get_submodule("blocks_0_0_input_codes")
    assert codes.channels_last == (target == "cpu")
    assert not any(isinstance(m, UniformQuantizer) for m in gm.modules())
    assert gm.fxquant_lowered == target
    info = dict(gm.fxquant_history)[f"lower{{target={target}}}" if target != "reference" else "lower"]
    assert info["integer_convs"] == 4 and "pixel_shuffle" in info["float_ops"]


@pytest.mark.parametrize("recipe", ["minmax-w8a8", "minmax-w6a6", "minmax-w4a4", "mse-w4a4",
                                    "percentile-w8a8"])
def test_targets_agree_with_fake_quant_on_the_whole_model(tiny_sr, calib, recipe):
    x = torch.rand(2, 3, 12, 10)
    fake_gm = fxquant.compile(tiny_sr, recipe, calib=calib)
    ref_gm = lowered(tiny_sr, calib, recipe, "reference")
    cpu_gm = lowered(tiny_sr, calib, recipe, "cpu")
    # on the same input every integer conv is within one output step of its fake-quant conv
    for other in (ref_gm, cpu_gm):
        agreement = layer_agreement(fake_gm, other, [x])
        assert len(agreement) == 4
        assert all(a.max_steps <= 1 for a in agreement), agreement
    with torch.no_grad():
        fake, ref, cpu = fake_gm(x), ref_gm(x), cpu_gm(x)
    span = float(fake.max() - fake.min())
    assert float((ref - fake).abs().max()) < 1e-2 * span
    assert float((cpu - ref).abs().max()) < 1e-2 * span


def test_symmetric_weights_need_no_correction(tiny_sr, calib):
    recipe = fxquant.Recipe.from_dict({"weights": {"observer": "symmetric"}})
    gm = lowered(tiny_sr, calib, recipe, "cpu")
    layers = [m for m in gm.modules() if isinstance(m, CpuConv2d)]
    assert layers and all(int((m.weight_centre != 0).sum()) == 0 for m in layers)


def test_lowered_model_saves_and_loads_with_its_state(tiny_sr, calib, tmp_path):
    gm = lowered(tiny_sr, calib, "minmax-w4a4", "cpu")
    path = tmp_path / "m.fxq"
    fxquant.save(gm, path)
    payload = torch.load(path, weights_only=True)
    assert payload["state_dict"]["blocks_0_0.weight_codes"].dtype == torch.int8
    fresh = type(tiny_sr)()  # other random weights: everything must come from the file
    loaded = fxquant.load(path, model=fresh)
    assert loaded.fxquant_lowered == "cpu"
    x = torch.rand(1, 3, 9, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        assert torch.equal(copy.deepcopy(gm)(x), gm(x))  # the opaque packed weight is rebuilt


def test_compiled_cpu_target_matches_eager(tiny_sr, calib):
    x = torch.rand(1, 3, 16, 16)
    eager = lowered(tiny_sr, calib, "minmax-w8a8", "cpu")
    compiled = lowered(tiny_sr, calib, "minmax-w8a8", "cpu", ",compile=true")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)


def test_compiled_models_without_module_guards_keep_their_own_weights_and_sizes(tiny_sr, calib):
    """lower{compile=true} drops Dynamo's guards on the modules: two compiled models of the
    same class with other weights must still each run their own, and a second input size
    (its guard kept) must compile again rather than reuse the first size's code."""
    torch.manual_seed(5)
    other = type(tiny_sr)().eval()
    models = [lowered(m, calib, "minmax-w8a8", "cpu", ",compile=true") for m in (tiny_sr, other)]
    eagers = [lowered(m, calib, "minmax-w8a8", "cpu") for m in (tiny_sr, other)]
    with torch.no_grad():
        for size in (16, 11):
            x = torch.rand(1, 3, size, size)
            outs = [m(x) for m in models]
            for out, eager in zip(outs, eagers):
                torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-5)
            assert outs[0].shape[-1] == 2 * size and (outs[0] - outs[1]).abs().max() > 1e-2


def test_lowering_leaves_the_users_model_alone(tiny_sr, calib):
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    lowered(tiny_sr, calib, "minmax-w4a4", "cpu")
    for key, value in tiny_sr.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- errors
def test_nothing_to_lower(tiny_sr, calib):
    with pytest.raises(PassError, match="nothing to lower.*after 'quantize'"):
        fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib, pipeline="trace,lower")


def test_per_channel_activations_are_refused(tiny_sr, calib):
    recipe = fxquant.Recipe.from_dict({"activations": {"granularity": "per-channel"}})
    with pytest.raises(PassError, match="per-channel.*u8 kernels take per-tensor"):
        lowered(tiny_sr, calib, recipe)


def test_a_quantized_value_feeding_an_op_without_integer_kernel(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib, pipeline=UNIFORM)
    # route one quantizer's output into a ConvTranspose2d instead of its conv
    qnode = next(n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), UniformQuantizer))
    gm.add_submodule("deconv", nn.ConvTranspose2d(8, 8, 3, padding=1))
    with gm.graph.inserting_after(qnode):
        deconv = gm.graph.call_module("deconv", (qnode,))
    conv = next(u for u in qnode.users if u is not deconv)
    conv.update_arg(0, deconv)
    gm.recompile()
    manager = fxquant.pipeline.PassManager("lower")
    ctx = fxquant.pipeline.PassContext(recipe=gm.fxquant_recipe)
    with pytest.raises(PassError, match="feeds deconv \\(ConvTranspose2d\\), which has no "
                                        "integer kernel"):
        manager.run(gm, ctx)


def test_bad_target_and_lowering_twice(tiny_sr, calib):
    with pytest.raises(RecipeError, match="lower target 'tpu' unknown; valid: reference, cpu, gpu"):
        lowered(tiny_sr, calib, target="tpu")
    gm = lowered(tiny_sr, calib)
    with pytest.raises(PassError, match="already lowered"):
        fxquant.pipeline.PassManager("lower").run(gm, fxquant.pipeline.PassContext(
            recipe=gm.fxquant_recipe))


@pytest.mark.parametrize("bad,message", [
    (torch.rand(1, 4, 8, 8), "takes 3-channel images, got 4 channels"),
    (torch.rand(3, 8, 8), "N×C×H×W image batch, got \\(3, 8, 8\\)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "floating-point image, got torch.uint8"),
    (torch.rand(0, 3, 8, 8), "empty batch"),
])
def test_inputs_the_lowered_model_cannot_take(tiny_sr, calib, bad, message):
    gm = lowered(tiny_sr, calib, target="cpu")
    assert isinstance(gm.get_submodule("input_guard"), InputGuard)
    with pytest.raises(LoweringError, match=message):
        gm(bad)


def test_lowered_graph_is_a_graph_module(tiny_sr, calib):
    assert isinstance(lowered(tiny_sr, calib), fx.GraphModule)


class Fork(nn.Module):
    """A value (h) read by two convs, then a residual add: h is quantized once."""

    def __init__(self):
        super().__init__()
        self.head, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), \
            nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        return self.tail(self.b(h) + self.c(h) + h)


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_a_shared_tensor_is_one_integer_tensor_read_by_both_convs(calib, target):
    torch.manual_seed(0)
    model = Fork().eval()
    gm = lowered(model, calib, target=target)
    codes = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), IntegerQuantize)]
    assert [n.name for n in codes] == ["head_shared_input_codes"]
    assert sorted(u.target for u in codes[0].users) == ["b", "c"]
    x = torch.rand(1, 3, 10, 10)
    fake = fxquant.compile(model, "minmax-w8a8", calib=calib)
    assert all(a.max_steps <= 1 for a in layer_agreement(fake, gm, [x]))


class Upsampler(nn.Module):
    """conv -> pixel shuffle -> conv -> pixel shuffle -> conv (EDSR's x4 tail)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.up1, self.up2 = nn.Conv2d(8, 32, 3, padding=1), nn.Conv2d(8, 32, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = nn.functional.pixel_shuffle(self.up1(self.head(x)), 2)
        return self.tail(nn.functional.pixel_shuffle(self.up2(h), 2))


def test_cpu_target_shuffles_codes_and_keeps_shuffles_out_of_inductor(calib):
    torch.manual_seed(0)
    model = Upsampler().eval()
    gm = lowered(model, calib, target="cpu")
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes if n.op != "placeholder"]
    shuffles = [i for i, (_, t) in enumerate(ops) if "fxquant.pixel_shuffle" in t]
    assert len(shuffles) == 2 and not any(t.endswith(".pixel_shuffle") and "fxquant" not in t
                                          for _, t in ops)
    # the first shuffle reads uint8 codes (quantize moved in front of it), the second floats
    first = [n for n in gm.graph.nodes if "fxquant.pixel_shuffle" in str(n.target)][0]
    assert isinstance(gm.get_submodule(first.args[0].target), IntegerQuantize)
    x = torch.rand(1, 3, 6, 7)
    with torch.no_grad():
        ref = lowered(model, calib, target="reference")(x)
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config,message", [
    ({"weights": {"bits": 12}}, "weights of 'blocks.0.0' use a uniform quantizer of 12 bits"),
    ({"activations": {"bits": 12}}, "per-tensor, 12 bits, affine: the u8 kernels take"),
])
def test_bit_widths_beyond_int8_are_refused(tiny_sr, calib, config, message):
    with pytest.raises(PassError, match=message):
        lowered(tiny_sr, calib, fxquant.Recipe.from_dict(config))


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_convs_emit_the_next_quantizers_codes(tiny_sr, calib, tmp_path, bits):
    """conv → ReLU → quantize fuses into one conv emitting uint8 codes (ReLU and
    requantization in oneDNN); codes match the reference's within one step."""
    recipe = fxquant.Recipe.from_dict({"weights": {"observer": "symmetric", "bits": bits},
                                       "activations": {"bits": bits}})
    gm = lowered(tiny_sr, calib, recipe, "cpu")
    info = gm.fxquant_history[-2][1]
    assert info["uint8_outputs"] == 2  # blocks.0.0 and blocks.1.0 (each followed by a ReLU)
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes
             if n.op == "call_module"]
    assert kinds == ["InputGuard", "Conv2d", "IntegerQuantize", "CpuConv2d", "CpuConv2d",
                     "IntegerQuantize", "CpuConv2d", "CpuConv2d", "Conv2d"]
    ref = lowered(tiny_sr, calib, recipe, "reference")
    x = torch.rand(2, 3, 11, 9)
    fused, ref_codes = {}, {}
    gm.get_submodule("blocks_0_0").register_forward_hook(lambda m, a, out: fused.update(c=out))
    ref.get_submodule("blocks_0_2").register_forward_pre_hook(
        lambda m, a: ref_codes.update(c=a[0]))
    with torch.no_grad():
        out, expected = gm(x), ref(x)
    assert fused["c"].dtype == torch.uint8 and int(fused["c"].max()) <= 2 ** bits - 1
    assert int((fused["c"].int() - ref_codes["c"].int()).abs().max()) <= 1
    span = float(expected.max() - expected.min())
    assert float((out - expected).abs().max()) < 0.05 * span
    # the fusion follows from the recipe: a saved model rebuilds to the same graph
    path = tmp_path / "fused.fxq"
    fxquant.save(gm, path)
    loaded = fxquant.load(path, model=type(tiny_sr)())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def test_fusion_can_be_switched_off(tiny_sr, calib):
    recipe = fxquant.Recipe.from_dict({"weights": {"observer": "symmetric"}})
    gm = lowered(tiny_sr, calib, recipe, "cpu", ",fuse=false")
    assert gm.fxquant_history[-2][1]["uint8_outputs"] == 0
    with pytest.raises(RecipeError, match="lower.fuse applies to targets cpu and gpu only"):
        lowered(tiny_sr, calib, recipe, "reference", ",fuse=false")


def test_lowered_copy_records_the_lower_pass_and_round_trips(tiny_sr, calib, tmp_path):
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    gm = fxquant.lowered_copy(fake, "cpu")
    assert not getattr(fake, "fxquant_lowered", None)  # the fake-quant model is untouched
    assert gm.fxquant_pipeline == fake.fxquant_pipeline + ",lower{target=cpu}"
    assert gm.fxquant_history[-1][0] == "lower{target=cpu}"
    fxquant.save(gm, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=type(tiny_sr)())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert loaded.fxquant_lowered == "cpu" and torch.equal(loaded(x), gm(x))


def test_a_fan_in_beyond_the_int32_bound_is_refused():
    """7 400 input channels × 3×3 = 66 600 > 65 793: the pass names the layer."""
    model = nn.Sequential(nn.Conv2d(3, 7400, 1), nn.Conv2d(7400, 2, 3, padding=1),
                          nn.Conv2d(2, 3, 1)).eval()
    with pytest.raises(PassError, match="fan-in 66600 at 8 bits can overflow the int32 "
                                        "accumulator"):
        fxquant.compile(model, "minmax-w8a8", calib=torch.rand(1, 3, 4, 4),
                        pipeline=f"{UNIFORM},lower")


class BilinearSkip(nn.Module):
    """PAN's shape: a body, a nearest upsampler, and a bilinear global skip of the input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.body(self.head(x)))
        up = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
        skip = nn.functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.tail(up) + skip


@pytest.mark.parametrize("compile", [False, True])
def test_cpu_target_runs_smooth_upsampling_on_aten(calib, compile):
    torch.manual_seed(0)
    model = BilinearSkip().eval()
    fake = fxquant.compile(model, "mse-w8a8-sym", calib=calib)
    gm = fxquant.lowered_copy(fake, "cpu", compile=compile)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count("fxquant.upsample") == 1  # the bilinear skip
    nearest = [n for n in gm.graph.nodes if n.target is nn.functional.interpolate]
    assert len(nearest) == 1 and nearest[0].kwargs["mode"] == "nearest"  # left to Inductor
    x = torch.rand(2, 3, 10, 12)
    reference = fxquant.lowered_copy(fake, "reference")
    with torch.no_grad():
        out, expected = gm(x), reference(x)
    assert out.shape == (2, 3, 20, 24)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))
