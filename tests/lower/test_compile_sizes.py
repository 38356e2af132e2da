"""``lower{target=cpu,compile=true}`` across input sizes: the first size compiles static
kernels, a second one compiles once more with symbolic height and width, and every later
size reuses that graph (Dynamo's automatic dynamic shapes). Nothing in a lowered graph may
branch on the size in a way that adds a guard per size: the per-(image, channel) statistics'
position chunks did (one recompile per pattern of divisors, fxquant/quant/channel_norm.py)."""

from __future__ import annotations

import pytest
import torch

import fxquant

pytestmark = pytest.mark.usefixtures("one_thread")

# sizes whose position counts split into different chunks when the size is known
# (reduction_chunks: 4, 3, 1, 6, 1, 12, 3, 4, 5, 3)
SIZES = [(16, 16), (12, 20), (17, 29), (20, 24), (13, 13), (24, 32), (15, 21), (18, 18),
         (11, 30), (27, 19)]


@pytest.fixture
def strict_recompiles():
    """At most 3 compiles of each frame (static, dynamic, one spare for a size threshold of
    Inductor's own), and a hit raises instead of quietly running eagerly."""
    torch._dynamo.reset()  # earlier tests' compiles of shared code objects count too
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe,mean_tol", [
    ("minmax-w8a8", 1e-6),
    # dynamic statistics: Inductor's reductions round differently from eager's, and a code
    # at a rounding tie can flip (test_daq_lowering, test_dfsq_lowering)
    ("daq-w4a4", 2e-3), ("dfsq-w4a4", 2e-3)])
def test_ten_sizes_compile_at_most_three_times(recipe, mean_tol, tiny_sr, calib, monkeypatch,
                                               strict_recompiles):
    from fxquant.lower import search

    monkeypatch.setattr(search, "float_lanes", lambda: 8)  # TinySR's 8 channels search
    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu")
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.rand(1, 3, height, width, generator=generator)
            out, expected = compiled(x), eager(x)
            assert out.shape == (1, 3, 2 * height, 2 * width)
            error = (out - expected).abs().mean().item()
            assert error < mean_tol, (height, width, error)
