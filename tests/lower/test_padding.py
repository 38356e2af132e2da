"""Padding of lowered convs (fxquant/lower/padding.py): ``padding='same'``/``'valid'`` resolve
to numbers, and reflect/replicate/circular padding pads the input codes, which commutes
with quantization, so every target equals the fake-quant model as with zero padding."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.errors import PassError
from fxquant.lower.compare import daq_layer_agreement
from fxquant.lower.conv import IntegerConv2d, LoweringError
from fxquant.lower.folded import DaqConv2d
from fxquant.lower.padding import lowered_padding, pad_codes
from fxquant.lower.uniform_codes import quantize_codes

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("reflect", "replicate", "circular")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 16), mode=st.sampled_from(MODES),
       pads=st.tuples(*[st.integers(0, 3)] * 4), scale=st.floats(0.005, 0.5),
       zero_point=st.integers(0, 255), nhwc=st.booleans())
def test_padding_the_codes_equals_the_codes_of_the_padded_input(seed, mode, pads, scale,
                                                                zero_point, nhwc):
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(seed))
    if nhwc:
        x = x.contiguous(memory_format=torch.channels_last)
    codes = quantize_codes(x, torch.tensor(scale), torch.tensor(zero_point), 255)
    padded = pad_codes(codes, pads, mode)
    assert torch.equal(padded, quantize_codes(F.pad(x, pads, mode=mode), torch.tensor(scale),
                                              torch.tensor(zero_point), 255))
    assert padded.is_contiguous(memory_format=torch.channels_last if nhwc
                                else torch.contiguous_format)
    planes = pad_codes([codes, codes], pads, mode)  # DFSQ's code planes: each padded alike
    assert all(torch.equal(plane, padded) for plane in planes)


# padding of the two quantized (middle) convs: (padding, padding_mode, kernel)
CASES = {
    "reflect": (1, "reflect", 3), "replicate": (1, "replicate", 3),
    "circular": (2, "circular", 5), "same": ("same", "zeros", 3), "valid": ("valid", "zeros", 3),
    "same-even-reflect": ("same", "reflect", 4),
}


class Padded(nn.Module):
    """Float first and last convs (the recipes keep them), two quantized ones in between."""

    def __init__(self, padding, mode: str, kernel: int):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, kernel, padding=padding, padding_mode=mode), nn.ReLU(),
            nn.Conv2d(8, 8, kernel, padding=padding, padding_mode=mode, dilation=1), nn.ReLU(),
            nn.Conv2d(8, 12, 3, padding=1))
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.body(x))


@pytest.mark.parametrize("recipe", ["minmax-w8a8", "daq-w4a4", "dfsq-w4a4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_lowered_padding_equals_the_fake_quant_conv(case, recipe, calib):
    padding, mode, kernel = CASES[case]
    model = Padded(padding, mode, kernel).eval()
    fake = fxquant.compile(model, recipe, calib=calib)
    reference, cpu = (fxquant.lowered_copy(fake, target) for target in ("reference", "cpu"))
    lowered = [m for m in reference.modules() if isinstance(m, (IntegerConv2d, DaqConv2d))]
    assert len(lowered) == 2
    source = model.body[2]
    for layer in lowered:
        if mode == "zeros":  # numbers, symmetric: 'same' → k//2, 'valid' → 0
            expected = (kernel // 2,) * 2 if padding == "same" else (0, 0)
            assert (layer.padding, layer.pre_pad) == (expected, None)
        else:  # the codes are padded with the mode, the kernel runs unpadded
            assert layer.padding == (0, 0) and layer.pad_mode == mode
            assert layer.pre_pad == tuple(source._reversed_padding_repeated_twice)
    x = torch.rand(2, 3, 11, 13, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_fake, out_ref, out_cpu = fake(x), reference(x), cpu(x)
    torch.testing.assert_close(out_ref, out_fake, rtol=0, atol=1e-5)
    if recipe == "minmax-w8a8":
        torch.testing.assert_close(out_cpu, out_ref, rtol=0, atol=1e-5)
    else:  # the cpu target's two int8 planes of the per-image folded weights
        agreement = daq_layer_agreement(fake, cpu, [x])
        assert len(agreement) == 2 and max(d for _, d, _ in agreement) < 3e-4


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_that_is_not_symmetric_is_refused_with_zeros(calib):
    fake = fxquant.compile(Padded("same", "zeros", 4).eval(), "minmax-w8a8", calib=calib)
    with pytest.raises(LoweringError, match=r"padding='same' with kernel \(4, 4\).*one more"):
        fxquant.lowered_copy(fake, "cpu")
    fake = fxquant.compile(Padded("same", "zeros", 4).eval(), "daq-w4a4", calib=calib)
    with pytest.raises(PassError, match=r"padding='same'.*give the conv an odd kernel"):
        fxquant.lowered_copy(fake, "reference")


def test_lowered_padding_of_a_plain_conv():
    assert lowered_padding(nn.Conv2d(2, 2, 3, padding=(1, 2))) == ((1, 2), None, "zeros")
    assert lowered_padding(nn.Conv2d(2, 2, (3, 5), padding="same", dilation=2)) == \
        ((2, 4), None, "zeros")
    assert lowered_padding(nn.Conv2d(2, 2, 3, padding=(1, 2), padding_mode="replicate")) == \
        ((0, 0), (2, 2, 1, 1), "replicate")
