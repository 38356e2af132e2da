"""The folded convs of DAQ/DFSQ on tiny maps (fxquant/lower/folded.py,
``CpuDaqConv2d.small_map``): a channel attention's 1×1 maps are convolved in float32 from
the dequantized codes, in eager and inside lower{compile=true}'s region, while full maps keep
the int8 conv."""

import pytest
import torch
from torch import nn

import fxquant
from fxquant.lower.conv import LoweringError
from fxquant.lower.folded import CpuDaqConv2d, ReferenceDaqConv2d


class AttentionSR(nn.Module):
    """conv → ReLU → squeeze-excite (avg pool to 1×1, two 1×1 convs) → conv → pixel shuffle:
    the channel attention of IMDN/RCAN in small."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(16, 4, 1)
        self.excite = nn.Conv2d(4, 16, 1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)
        self.tail = nn.Conv2d(16, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        y = torch.relu(self.head(x))
        a = torch.sigmoid(self.excite(torch.relu(self.squeeze(self.pool(y)))))
        return self.shuffle(self.tail(torch.relu(self.body(y * a))))


@pytest.fixture(scope="module")
def fake():
    torch.manual_seed(0)
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return fxquant.compile(AttentionSR().eval(), "dfsq-w4a4", calib=calib)


def _conv_calls(monkeypatch):
    """Which folded convs take which path, filled as they run: ``{the fake-quant conv's
    name: 'float' | 'int8'}``."""
    taken = {}
    float_conv, int_conv = CpuDaqConv2d.dequantized_conv, CpuDaqConv2d.integer_conv
    monkeypatch.setattr(CpuDaqConv2d, "dequantized_conv",
                        lambda self, *a: taken.setdefault(self.source, "float") and
                        float_conv(self, *a))
    monkeypatch.setattr(CpuDaqConv2d, "integer_conv",
                        lambda self, *a: taken.setdefault(self.source, "int8") and
                        int_conv(self, *a))
    return taken


def test_one_pixel_maps_take_the_float_conv_and_full_maps_int8(fake, monkeypatch):
    lowered = fxquant.lowered_copy(fake, "cpu", planes=1)
    taken = _conv_calls(monkeypatch)
    with torch.no_grad():
        lowered(torch.rand(1, 3, 16, 16))
    assert {n for n, path in taken.items() if path == "float"} == {"squeeze", "excite"}
    assert {n for n, path in taken.items() if path == "int8"} == {"body"}  # tail: float


def test_float_conv_follows_the_reference_closer_than_int8(fake):
    """The float path has no int8 requantization of the folded weights: its output sits on
    the reference's up to float32 rounding, where one int8 weight plane misses by far more
    (the ratio is measured, not assumed: the full-map convs' own error)."""
    reference = fxquant.lowered_copy(fake, "reference")
    cpu = fxquant.lowered_copy(fake, "cpu", planes=1)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_small = reference.squeeze(_packed_input(reference, "squeeze_input_codes", x))
        got_small = cpu.squeeze(_packed_input(cpu, "squeeze_input_codes", x))
        ref_full = reference.body(_packed_input(reference, "body_input_codes", x))
        got_full = cpu.body(_packed_input(cpu, "body_input_codes", x))
    small = float((got_small - ref_small).abs().max() / ref_small.abs().max())
    full = float((got_full - ref_full).abs().max() / ref_full.abs().max())
    assert small < 1e-5 < full


def _packed_input(lowered, codes_name: str, x):
    """The ``(codes, Δ, β, ĉ)`` the codes module ``codes_name`` hands its conv on input ``x``."""
    seen = {}
    module = getattr(lowered, codes_name)
    handle = module.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    lowered(x)
    handle.remove()
    return seen["out"]


def test_reference_target_keeps_its_exact_conv(fake):
    reference = fxquant.lowered_copy(fake, "reference")
    assert isinstance(reference.squeeze, ReferenceDaqConv2d)
    assert not isinstance(reference.squeeze, CpuDaqConv2d)


def test_compiled_model_computes_the_float_conv_in_its_region(fake, monkeypatch):
    """Under lower{compile=true} a 1×1 conv's float output is computed in the compiled
    region (the ``prepare`` node) and its eager call only hands it on, while the full map's
    conv gets its fold; the model follows the eager one."""
    seen = {}
    forward = CpuDaqConv2d.forward

    @torch.compiler.disable
    def recording(self, packed, prepared=None):
        seen[self.source] = type(prepared).__name__
        return forward(self, packed, prepared)

    monkeypatch.setattr(CpuDaqConv2d, "forward", recording)
    eager = fxquant.lowered_copy(fake, "cpu", planes=1)
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True, planes=1)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    assert seen == {"squeeze": "Tensor", "excite": "Tensor", "body": "tuple"}


def test_the_eager_forward_is_not_compiled_as_a_frame_of_its_own(fake):
    """Dynamo breaks the graph at the folded conv's call and runs its forward as it is: a
    traced forward with the break inside would be compiled as a frame of its own, once per
    conv shape, and hit Dynamo's recompile limit (with a warning) on larger models."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    compiled = fxquant.lowered_copy(fake, "cpu", compile=True, planes=1)
    with torch.no_grad():
        compiled(torch.rand(1, 3, 16, 16))
    for method in (CpuDaqConv2d.forward, CpuDaqConv2d.integer_conv):
        code = getattr(method, "__wrapped__", method).__code__
        assert not _debug_get_cache_entry_list(code)


def test_a_nan_step_on_a_small_map_is_refused_by_name(fake):
    cpu = fxquant.lowered_copy(fake, "cpu", planes=1)
    codes, step, offset, centre = _packed_input(cpu, "squeeze_input_codes", torch.rand(1, 3, 8, 8))
    step = step.clone()
    step[0, 0] = float("nan")
    with pytest.raises(LoweringError, match="overflow"):
        cpu.squeeze((codes, step, offset, centre))
