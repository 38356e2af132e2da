"""``deconv-to-conv`` and ``layers.op_types = ["conv2d", "conv_transpose2d"]``: a transposed
conv becomes conv → pixel shuffle (→ crop) with the float function kept, and is then quantized
and lowered like any conv; the ones it cannot convert stay float, named with the reason."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import PassContext, Recipe
from fxquant.graph import select_layers
from fxquant.lower.conv import IntegerConv2d
from fxquant.passes.deconv_to_conv import DeconvToConvPass
from fxquant.passes.trace import TracePass
from fxquant.quant import QuantConv2d

pytestmark = pytest.mark.usefixtures("one_thread")

DECONVS = {"layers": {"op_types": ["conv2d", "conv_transpose2d"]}}


class DeconvMiddle(nn.Module):
    """×2 (or ×3): head, a transposed-conv upsampler in the body, convs after it."""

    def __init__(self, up: nn.Module | None = None):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.up = up if up is not None else nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.post = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        f = torch.relu(self.body(torch.relu(self.head(x))))
        return self.tail(torch.relu(self.post(torch.relu(self.up(f)))))


def model(up: nn.Module | None = None) -> DeconvMiddle:
    torch.manual_seed(0)
    return DeconvMiddle(up).eval()


def converted(m: nn.Module):
    ctx = PassContext(recipe=Recipe.from_dict(DECONVS))
    gm = TracePass()(m, ctx).graph_module
    return DeconvToConvPass()(gm, ctx)


@pytest.mark.parametrize("up, crop", [
    (nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1), None),
    (nn.ConvTranspose2d(8, 8, 9, stride=3, padding=4, output_padding=2), (3, 0)),
    (nn.ConvTranspose2d(8, 8, 3, stride=1, padding=1), None),  # the flipped kernel, no shuffle
])
def test_graph_is_conv_shuffle_crop_with_the_float_function_kept(up, crop):
    m = model(up)
    result = converted(m)
    gm = result.graph_module
    assert result.modified and result.info == {"converted": ["up"], "kept_float": {}}
    (node,) = [n for n in gm.graph.nodes if n.target == "up"]
    assert node.name == "up_subpixel"  # not the teacher's "up", the transposed conv's output
    assert type(gm.get_submodule("up")) is nn.Conv2d  # the same name: include/exclude match
    assert gm.get_submodule("up").out_channels == 8 * up.stride[0] ** 2
    (reader,) = node.users
    if up.stride[0] > 1:
        assert reader.target is F.pixel_shuffle and reader.args[1] == up.stride[0]
        (reader,) = reader.users
    if crop:
        assert reader.target is operator.getitem
        _, rows, cols = reader.args[1]
        assert (rows.start, rows.stop, cols.start, cols.stop) == (crop[0], None, crop[0], None)
        (reader,) = reader.users
    assert reader.target is torch.relu
    x = torch.rand(2, 3, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=1e-5)
    assert type(m.up) is nn.ConvTranspose2d  # the user's model is not touched


class SharedUp(nn.Module):
    """One transposed conv called twice (a weight-shared upsampler)."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(x) + self.up(2 * x)


def test_a_transposed_conv_called_twice_is_converted_once_and_read_twice():
    torch.manual_seed(0)
    m = SharedUp().eval()
    result = converted(m)
    assert result.info["converted"] == ["up", "up_1"]
    assert type(result.graph_module.get_submodule("up")) is nn.Conv2d
    shuffles = [n for n in result.graph_module.graph.nodes if n.target is F.pixel_shuffle]
    assert len(shuffles) == 2
    x = torch.rand(1, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), m(x), rtol=0, atol=1e-5)


def test_transposed_convs_without_a_conv_form_stay_float_and_are_named():
    m = model(nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2))
    result = converted(m)
    assert not result.modified
    assert result.info["converted"] == []
    assert "groups=2" in result.info["kept_float"]["up"]
    selection = select_layers(result.graph_module, Recipe.from_dict(DECONVS).layers)
    assert "up" not in [n.name for n in selection.nodes]
    assert "transposed conv kept float" in selection.skipped["up"]


class SizedUp(nn.Module):
    """A transposed conv told its output size at the call."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 3, 3, stride=2, padding=1)

    def forward(self, x, skip):
        return self.up(x, output_size=skip.shape) + skip


def test_a_call_with_output_size_stays_float_and_is_named():
    m = SizedUp().eval()
    ctx = PassContext(recipe=Recipe.from_dict(DECONVS))
    result = DeconvToConvPass()(TracePass()(m, ctx).graph_module, ctx)
    assert not result.modified and "output_size" in result.info["kept_float"]["up"]
    x, skip = torch.rand(1, 3, 5, 5), torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(result.graph_module(x, skip), m(x, skip))


def test_op_types_select_the_converted_conv_as_the_transposed_conv_it_was():
    result = converted(model())
    only = Recipe.from_dict({"layers": {"op_types": ["conv_transpose2d"],
                                        "keep_first_last": False}}).layers
    assert [n.name for n in select_layers(result.graph_module, only).nodes] == ["up_subpixel"]
    plain = Recipe.from_dict({"layers": {"keep_first_last": False}}).layers  # conv2d alone
    selection = select_layers(result.graph_module, plain)
    assert "up_subpixel" not in [n.name for n in selection.nodes]
    assert selection.skipped["up_subpixel"] == "op type ConvTranspose2d not in layers.op_types"


def test_the_op_type_puts_the_pass_after_trace():
    assert Recipe.from_dict({}).pipeline_spec == "trace,observe,calibrate,quantize,verify"
    assert Recipe.from_dict(DECONVS).pipeline_spec == \
        "trace,deconv-to-conv,observe,calibrate,quantize,verify"
    explicit = {**DECONVS,
                "pipeline": "trace,observe,calibrate,quantize,reconstruct{steps=5},verify"}
    assert Recipe.from_dict(explicit).pipeline_spec.startswith("trace,deconv-to-conv,observe,")
    named = {**DECONVS, "pipeline": "trace,equalize,deconv-to-conv,observe,calibrate,quantize"}
    assert Recipe.from_dict(named).pipeline_spec == named["pipeline"]


@pytest.mark.parametrize("recipe", ["mse-w8a8", "daq-w4a4", "dfsq-w4a4", "i2nq-w4a4",
                                    "odm-v2-w4a4"])
def test_the_transposed_conv_is_quantized_and_lowered(recipe, tmp_path):
    m = model()
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    spec = fxquant.load_preset(recipe).to_dict()
    spec["layers"]["op_types"] = ["conv2d", "conv_transpose2d"]
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = fxquant.compile(m, Recipe.from_dict(spec), calib=calib)
    assert isinstance(gm.get_submodule("up"), QuantConv2d)
    plain = fxquant.compile(m, recipe, calib=calib)  # without the op type: float, as before
    assert type(plain.get_submodule("up")) is nn.ConvTranspose2d
    x = torch.rand(1, 3, 10, 11)
    with torch.no_grad():
        fake = gm(x)
        lowered = {t: fxquant.lowered_copy(gm, t) for t in ("reference", "cpu")}
        out = {t: lm(x) for t, lm in lowered.items()}
    assert fake.shape == (1, 3, 20, 22)
    assert isinstance(lowered["reference"].get_submodule("up"), IntegerConv2d) or \
        type(lowered["reference"].get_submodule("up")).__name__.endswith("DaqConv2d")
    # the reference lowering computes what fake-quant computes (float rounding apart)
    torch.testing.assert_close(out["reference"], fake, rtol=0, atol=1e-5)
    step = float(fake.abs().max()) / 2 ** 6  # cpu: a few codes may flip by float rounding
    assert (out["cpu"] - out["reference"]).abs().mean() < step / 100
    assert all(torch.equal(weights[k], v) for k, v in m.state_dict().items())
    fxquant.save(gm, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=model())
    with torch.no_grad():
        assert torch.equal(loaded(x), fake)



class DeconvAdd(DeconvMiddle):
    """The transposed conv's output read by an add: observe{outputs=true} quantizes it."""

    def forward(self, x):
        f = torch.relu(self.body(torch.relu(self.head(x))))
        u = self.up(f) + F.interpolate(f, scale_factor=2.0)
        return self.tail(torch.relu(self.post(u)))


def test_reconstruct_does_not_pair_the_conv_phases_with_the_transposed_conv_output():
    """With output quantizers the conv's own output is quantized; the feature loss must not
    match it to the float graph's ``up`` (the transposed conv's output, as many elements)."""
    from fxquant.passes.reconstruct import ReconstructPass

    torch.manual_seed(0)
    m = DeconvAdd().eval()
    calib = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = fxquant.compile(m, Recipe.from_dict({**DECONVS, "pipeline": (
        "trace,observe{outputs=true},calibrate,quantize,verify")}), calib=calib)
    teacher = TracePass()(m, PassContext(recipe=Recipe.from_dict({}))).graph_module
    readers = {n.args[0].name for n in gm.graph.nodes if n.name.endswith("output_quantizer")}
    assert "up_subpixel" in readers  # the converted conv's output is quantized...
    features = ReconstructPass._features(gm, teacher)
    assert "up_subpixel" not in features and "up" not in features  # ...and not distilled
    assert "add" in features  # the value after the shuffle is the same in both graphs
