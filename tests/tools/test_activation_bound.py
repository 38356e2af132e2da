"""tools/activation_bound.py: per-image activation quantization, the layers it hooks, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.errors import FxquantError

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("activation_bound")


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), seed=st.integers(0, 2**16), shift=st.floats(-2.0, 2.0))
def test_per_image_grid_has_its_levels_and_half_step_error(tool, bits, seed, shift):
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(seed)) * 3 + shift
    x[0, 0, 0, 0] = 0.0
    q = tool.per_image_fake_quant(x, bits)
    lo = x.amin((2, 3), keepdim=True).clamp(max=0)
    hi = x.amax((2, 3), keepdim=True).clamp(min=0)
    step = (hi - lo) / (2 ** bits - 1)
    assert ((q - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()  # nothing clipped
    for n in range(2):
        for c in range(3):
            assert q[n, c].unique().numel() <= 2 ** bits
    assert q[0, 0, 0, 0] == 0  # the widened range keeps 0 a level
    # each (image, channel) on its own grid: another image's values do not change it
    alone = tool.per_image_fake_quant(x[1:], bits)
    torch.testing.assert_close(alone, q[1:])


def test_layers_take_the_activation_quantizers_bits_not_the_weights(tool, tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, {"weights": {"bits": 4}, "activations": {"bits": 6}},
                         calib=calib)
    assert tool.activation_inputs(gm) == {
        name: (f"{name.replace('.', '_')}_input_quantizer", 6) for name in LAYERS}


def test_hooks_quantize_each_input_and_come_off(tool, tiny_sr):
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = tiny_sr(x)
        seen = []
        handles = tool.quantize_inputs(tiny_sr, {"blocks.0.2": 2})
        probe = tiny_sr.get_submodule("blocks.0.2").register_forward_pre_hook(
            lambda module, args: seen.append(args[0]))
        hooked = tiny_sr(x)
        probe.remove()
        for handle in handles:
            handle.remove()
        assert not torch.equal(hooked, reference)
        assert all(seen[0][n, c].unique().numel() <= 4 for n in range(2) for c in range(8))
        torch.testing.assert_close(tiny_sr(x), reference, rtol=0, atol=0)


def test_a_model_without_uniform_input_quantizers_is_refused(tool, tiny_sr):
    plain = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 3)))
    with pytest.raises(FxquantError, match="no layer whose input a uniform quantizer"):
        tool.activation_inputs(plain)
    with pytest.raises(FxquantError, match="no module 'blocks.9.0'"):
        tool.quantize_inputs(tiny_sr, {"blocks.9.0": 8})
