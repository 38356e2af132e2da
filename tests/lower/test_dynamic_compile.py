"""``lower{target=cpu,compile=true,dynamic=true}`` across input sizes: one graph with
symbolic height and width serves every size (one more after a square first size, and across
a size threshold of Inductor's own). Nothing in a lowered graph may branch on the size in a way that adds a guard per size:
the per-(image, channel) statistics' position chunks did (one recompile per pattern of
divisors, fxquant/quant/channel_norm.py). Without ``dynamic`` each size compiles anew."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

import fxquant
from fxquant.errors import RecipeError

pytestmark = pytest.mark.usefixtures("one_thread")

# sizes whose position counts split into different chunks when the size is known
# (reduction_chunks: 4, 3, 1, 6, 1, 12, 3, 4, 5, 3)
SIZES = [(16, 16), (12, 20), (17, 29), (20, 24), (13, 13), (24, 32), (15, 21), (18, 18),
         (11, 30), (27, 19)]


@pytest.fixture
def strict_recompiles():
    """At most 2 compiles of each frame, and a hit raises instead of quietly running eagerly.
    The spare: the first size is square, and Dynamo's duck sizing gives its height and width
    one symbol, so the first other shape compiles again (as would a size across a threshold of
    Inductor's own, maps of 4096 positions)."""
    torch._dynamo.reset()  # earlier tests' compiles of shared code objects count too
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe,mean_tol", [
    ("minmax-w8a8", 1e-6),
    # dynamic statistics (DAQ's take the same position chunks): Inductor's reductions round
    # differently from eager's, and a code at a rounding tie can flip (test_dfsq_lowering)
    ("dfsq-w4a4", 2e-3)])
def test_dynamic_compiles_ten_sizes_at_most_twice(recipe, mean_tol, tiny_sr, calib,
                                                  monkeypatch, strict_recompiles):
    from fxquant.lower import search

    monkeypatch.setattr(search, "float_lanes", lambda: 8)  # TinySR's 8 channels search
    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu")
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.rand(1, 3, height, width, generator=generator)
            out, expected = compiled(x), eager(x)
            assert out.shape == (1, 3, 2 * height, 2 * width)
            error = (out - expected).abs().mean().item()
            assert error < mean_tol, (height, width, error)


def test_static_graphs_compile_per_size(tiny_sr, calib, strict_recompiles):
    """The default: a third size is past the limit of 2 here, and the limit is what stops it."""
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    with torch.no_grad():
        for height, width in SIZES[:2]:
            compiled(torch.rand(1, 3, height, width))
        with pytest.raises(FailOnRecompileLimitHit):
            compiled(torch.rand(1, 3, *SIZES[2]))


def test_dynamic_without_compile_is_refused(tiny_sr, calib):
    with pytest.raises(RecipeError, match="give compile=true,dynamic=true"):
        fxquant.lowered_copy(fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib), "cpu",
                             dynamic=True)
