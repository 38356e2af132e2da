"""``observe{outputs=true}``: conv outputs read by float ops get a per-tensor quantizer (PT2E's
placement), those read only by quantized convs (directly or through a ReLU) do not; the lowered
``cpu`` conv then writes uint8 codes that a dequantize step reads, and every target agrees
with the fake-quant graph."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.lower.compare import layer_agreement
from fxquant.lower.conv import CpuConv2d
from fxquant.lower.uniform_codes import IntegerDequantize
from fxquant.quant import UniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINE = ("trace,observe{outputs=true},calibrate,quantize{w=8,a=8},verify")


class LeakySR(nn.Module):
    """IMDN-like: a leaky ReLU and a residual add read conv outputs in float."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.tail = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        y = nn.functional.leaky_relu(self.a(h), 0.05)  # a: read by a float op
        y = torch.relu(self.b(y))  # b: read only by c's quantizer, through a ReLU
        return nn.functional.pixel_shuffle(self.tail(h + self.c(y)), 2)  # c: by an add


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LeakySR().eval()


@pytest.fixture
def calib():
    return torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(3))


def test_outputs_read_by_float_ops_are_quantized_once(model, calib):
    gm = fxquant.compile(model, "mse-w8a8-sym", calib=calib, pipeline=PIPELINE)
    outputs = sorted(n for n, m in gm.named_modules()
                     if n.endswith("_output_quantizer") and isinstance(m, UniformQuantizer))
    assert outputs == ["a_output_quantizer", "c_output_quantizer"]
    # with the first and last conv in int8, the head's output is quantized, the tail's (the
    # image) is not
    every = fxquant.compile(model, "mse-w8a8-sym-all", calib=calib)
    assert sorted(n for n, _ in every.named_modules() if n.endswith("_output_quantizer")) == \
        ["a_output_quantizer", "c_output_quantizer", "head_output_quantizer"]
    info = dict(gm.fxquant_history)["observe{outputs=True}"]
    assert info["output_observers"] == 2
    plain = fxquant.compile(model, "mse-w8a8-sym", calib=calib)
    x = calib[:2]
    with torch.no_grad():
        ref, with_outputs, without = model(x), gm(x), plain(x)
    assert not torch.equal(with_outputs, without)  # one more rounding per quantized output
    assert float((with_outputs - ref).abs().max()) < 0.05


@pytest.mark.parametrize("target", ["reference", "cpu"])
def test_lowered_output_codes_follow_fake_quant(model, calib, target, tmp_path):
    gm = fxquant.compile(model, "mse-w8a8-sym", calib=calib, pipeline=PIPELINE)
    lowered = fxquant.lowered_copy(gm, target)
    assert sum(isinstance(m, IntegerDequantize) for m in lowered.modules()) == 2
    x = calib[:2]
    with torch.no_grad():
        expected, out = gm(x), lowered(x)
    step = float(gm.get_submodule("a_output_quantizer").scale)
    assert float((out - expected).abs().max()) < 4 * step  # codes may differ by one at ties
    agreement = layer_agreement(gm, lowered, [x])
    assert len(agreement) == 3 and max(a.max_steps for a in agreement) <= 1.0  # a, b, c
    if target == "cpu":
        info = dict(lowered.fxquant_history)["lower{target=cpu}"]
        assert info["uint8_outputs"] == 3  # a and c into their dequantize, b into c's input
        fused = [m for m in lowered.modules() if isinstance(m, CpuConv2d) and m._out_scale > 0]
        assert len(fused) == 3
    fxquant.save(lowered, tmp_path / "o.fxq")
    again = fxquant.load(tmp_path / "o.fxq", model=LeakySR().eval())
    with torch.no_grad():
        assert torch.equal(again(x), out)


class ShuffleTail(nn.Module):
    """CARN-M/EDSR-like upsampler: ``conv → ReLU → shuffle`` into a quantized conv, then
    ``conv → shuffle`` into the float last conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.up1 = nn.Conv2d(8, 32, 3, padding=1)
        self.up2 = nn.Conv2d(8, 32, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = h + self.body(h)
        u = nn.functional.pixel_shuffle(torch.relu(self.up1(h)), 2)
        return self.tail(nn.functional.pixel_shuffle(torch.relu(self.up2(u)), 2))


def test_upsampler_shuffles_codes_and_requantizes_nothing(calib, tmp_path):
    torch.manual_seed(0)
    model = ShuffleTail().eval()
    gm = fxquant.compile(model, "mse-w8a8-sym", calib=calib, pipeline=PIPELINE)
    # up1 reaches only up2's input quantizer (through ReLU and shuffle): no output quantizer
    # of its own, so no second rounding; up2 feeds the float tail, body an add
    outputs = sorted(n for n, _ in gm.named_modules() if n.endswith("_output_quantizer"))
    assert outputs == ["body_output_quantizer", "up2_output_quantizer"]
    lowered = fxquant.lowered_copy(gm, "cpu")
    shuffles = [n for n in lowered.graph.nodes if "pixel_shuffle" in str(n.target)]
    assert len(shuffles) == 2
    # both shuffles read a conv's uint8 codes: up1's in front of up2, up2's in front of its
    # dequantization (then the ReLU), which the float tail reads
    assert [type(lowered.get_submodule(s.args[0].target)).__name__ for s in shuffles] == \
        ["CpuConv2d", "CpuConv2d"]
    (dequantize,) = shuffles[1].users
    assert isinstance(lowered.get_submodule(dequantize.target), IntegerDequantize)
    (relu,) = dequantize.users
    assert [u.target for u in relu.users] == ["tail"]
    info = dict(lowered.fxquant_history)["lower{target=cpu}"]
    assert info["uint8_outputs"] == 3  # body, up1 (into up2's codes), up2 (the head is float)
    x = torch.rand(2, 3, 10, 12)
    reference = fxquant.lowered_copy(gm, "reference")
    with torch.no_grad():
        expected, out, ref = gm(x), lowered(x), reference(x)
    assert out.shape == expected.shape == (2, 3, 40, 48)
    span = float(expected.max() - expected.min())
    assert float((ref - expected).abs().max()) < 1e-2 * span
    assert float((out - ref).abs().max()) < 1e-2 * span
    fxquant.save(lowered, tmp_path / "s.fxq")
    again = fxquant.load(tmp_path / "s.fxq", model=ShuffleTail().eval())
    with torch.no_grad():
        assert torch.equal(again(x), out)
