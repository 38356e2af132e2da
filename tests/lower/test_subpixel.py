"""A strided transposed conv run as conv + pixel shuffle (fxquant/lower/subpixel.py): equal to
``ConvTranspose2d`` for every kernel, stride, padding and output padding; and the ``cpu``
target's use of it on a deconvolution-tailed model (FSRCNN's shape)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
import torch.nn.functional as F

from fxquant.lower.subpixel import (SubpixelConvTranspose2d, as_subpixel_conv, convertible,
                                     subpixel_refusal)

pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def deconvs(draw, min_stride: int = 2, wide_padding: bool = False):
    stride = draw(st.integers(min_stride, 4))
    kernel = (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    padding = tuple(draw(st.integers(0, k + 3 if wide_padding else k - 1)) for k in kernel)
    output_padding = tuple(draw(st.integers(0, stride - 1)) for _ in kernel)
    size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    out = [(n - 1) * stride - 2 * p + k + o
           for n, p, k, o in zip(size, padding, kernel, output_padding)]
    if min(out) <= 0:  # ConvTranspose2d itself refuses these
        padding = (0, 0)
    channels = (draw(st.integers(1, 5)), draw(st.integers(1, 3)))
    return stride, kernel, padding, output_padding, size, channels, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(deconvs(), st.integers(0, 2 ** 31 - 1))
def test_equals_the_transposed_conv(case, seed):
    stride, kernel, padding, output_padding, size, (cin, cout), bias = case
    torch.manual_seed(seed)
    deconv = nn.ConvTranspose2d(cin, cout, kernel, stride=stride, padding=padding,
                                output_padding=output_padding, bias=bias).double()
    x = torch.randn(2, cin, *size, dtype=torch.double)
    subpixel = SubpixelConvTranspose2d.from_conv_transpose(deconv)
    with torch.no_grad():
        expected, got = deconv(x), subpixel(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(deconvs(min_stride=1, wide_padding=True), st.integers(0, 2 ** 31 - 1))
def test_as_subpixel_conv_equals_the_transposed_conv(case, seed):
    """The plain Conv2d (equal padding) + pixel shuffle + constant crop that deconv-to-conv
    puts in the graph; stride 1 is the conv of the flipped kernel, no shuffle."""
    stride, kernel, padding, output_padding, size, (cin, cout), bias = case
    torch.manual_seed(seed)
    deconv = nn.ConvTranspose2d(cin, cout, kernel, stride=stride, padding=padding,
                                output_padding=output_padding, bias=bias).double()
    conv, (top, bottom, left, right) = as_subpixel_conv(deconv)
    assert type(conv) is nn.Conv2d and conv.out_channels == cout * stride ** 2
    assert conv.padding[0] >= 0 and conv.padding[1] >= 0
    x = torch.randn(2, cin, *size, dtype=torch.double)
    with torch.no_grad():
        expected, y = deconv(x), F.pixel_shuffle(conv(x), stride)
    got = y[..., top:y.shape[-2] - bottom, left:y.shape[-1] - right]
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_fsrcnn_tails_pads_and_crops():
    """FSRCNN's 9×9 tail (padding 4, output padding s − 1) pads equally at ×2 and ×4; at ×3
    the phases need 1 row before and 2 after, so the conv pads 2 and one phase row is cut."""
    for scale, (kernel, pad, crops) in {2: ((5, 5), (2, 2), (0, 0, 0, 0)),
                                        3: ((4, 4), (2, 2), (3, 0, 3, 0)),
                                        4: ((3, 3), (1, 1), (0, 0, 0, 0))}.items():
        conv, got = as_subpixel_conv(nn.ConvTranspose2d(56, 1, 9, stride=scale, padding=4,
                                                        output_padding=scale - 1))
        assert (conv.kernel_size, conv.padding, got) == (kernel, pad, crops)


def test_fsrcnn_tail_is_a_3x3_conv_into_16_phases():
    deconv = nn.ConvTranspose2d(56, 1, 9, stride=4, padding=4, output_padding=3)
    subpixel = SubpixelConvTranspose2d.from_conv_transpose(deconv)
    assert tuple(subpixel.weight.shape) == (16, 56, 3, 3)
    assert torch.equal(subpixel.bias, deconv.bias.detach().repeat(16))


@pytest.mark.parametrize("module", [
    nn.ConvTranspose2d(4, 2, 3, stride=1),  # no stride: nothing to gain
    nn.ConvTranspose2d(4, 2, 3, stride=2, groups=2),
    nn.ConvTranspose2d(4, 2, 3, stride=2, dilation=2),
    nn.ConvTranspose2d(4, 2, 3, stride=(2, 3)),
])
def test_what_is_not_converted(module):
    assert not convertible(module)
    with pytest.raises(ValueError, match="not a plain strided ConvTranspose2d"):
        SubpixelConvTranspose2d.from_conv_transpose(module)
    why = subpixel_refusal(module)  # deconv-to-conv converts stride 1 too, the rest not
    assert (why is None) == (module.stride == (1, 1))
    if why:
        with pytest.raises(ValueError, match="has no sub-pixel conv form: (groups=2|dilation|stride)"):
            as_subpixel_conv(module)


class DeconvTail(nn.Module):
    """FSRCNN's shape: float head, quantized middle, float strided transposed-conv tail."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(1, 8, 5, padding=2)
        self.act = nn.PReLU(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.PReLU(8)
        self.tail = nn.ConvTranspose2d(8, 1, 9, stride=3, padding=4, output_padding=2)

    def forward(self, x):
        return self.tail(self.act2(self.mid(self.act(self.head(x)))))


@pytest.mark.parametrize("target,converted", [("cpu", True), ("reference", False)])
def test_cpu_target_runs_the_tail_as_a_subpixel_conv(target, converted, tmp_path):
    torch.manual_seed(0)
    model = DeconvTail().eval()
    calib = torch.rand(8, 1, 10, 10, generator=torch.Generator().manual_seed(1))
    fake = fxquant.compile(model, "mse-w8a8-sym", calib=calib)
    gm = fxquant.compile(model, "mse-w8a8-sym", calib=calib, pipeline=(
        f"trace,observe,calibrate,quantize,lower{{target={target}}},verify"))
    kinds = {type(m) for m in gm.modules()}
    assert (SubpixelConvTranspose2d in kinds) == converted
    assert (nn.ConvTranspose2d in kinds) != converted
    info = dict(gm.fxquant_history)[f"lower{{target={target}}}" if target != "reference"
                                    else "lower"]
    assert info["subpixel_deconvs"] == int(converted)
    x = torch.rand(2, 1, 9, 11)
    with torch.no_grad():
        out, expected = gm(x), fake(x)
    assert out.shape == (2, 1, 27, 33)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))
    fxquant.save(gm, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=DeconvTail())
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
