"""Activation statistics, capture by module or node name, and the matplotlib plots."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import fxquant
from fxquant.distributions import (
    MissingDependency,
    activation_stats,
    capture_activations,
    channel_stats,
    figure_to_png,
    plot_activation,
    plot_channel_ranges,
    plot_histogram,
    quantizer_range,
    require_matplotlib,
)
from fxquant.tracing import trace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images():
    return torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(2))


def test_channel_stats_match_numpy():
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    stats = channel_stats(x)
    flat = x.numpy().reshape(2, 4, -1)
    np.testing.assert_allclose(stats["min"].numpy(), flat.min(axis=2), rtol=1e-6)
    np.testing.assert_allclose(stats["max"].numpy(), flat.max(axis=2), rtol=1e-6)
    np.testing.assert_allclose(stats["mean"].numpy(), flat.mean(axis=2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"].numpy(), flat.std(axis=2), rtol=1e-5)


def test_capture_by_module_name_input_and_output(tiny_sr, images):
    got = capture_activations(tiny_sr, images, ["blocks.0.0"], where="input")
    with torch.no_grad():
        head = tiny_sr.head(images)
        torch.testing.assert_close(got["blocks.0.0"][0], head)
        out = capture_activations(tiny_sr, [images[:1], images[1:]], ["head"], where="output")
    assert len(out["head"]) == 2
    torch.testing.assert_close(torch.cat(out["head"]), head)


def test_capture_by_node_name_on_a_graph_module(tiny_sr, images):
    gm = trace(tiny_sr)
    got = capture_activations(gm, images, ["add", "blocks.1.2"], where="output")
    with torch.no_grad():
        h = tiny_sr.head(images)
        h = h + tiny_sr.blocks[0](h)
        torch.testing.assert_close(got["add"][0], h)
        torch.testing.assert_close(got["blocks.1.2"][0], tiny_sr.blocks[1](h))
        # "input" of a node is its first input's value
        before = capture_activations(gm, images, ["add_1"], where="input")
    torch.testing.assert_close(before["add_1"][0], h)
    with pytest.raises(ValueError, match="no module or node named"):
        capture_activations(gm, images, ["nope"])
    with pytest.raises(ValueError, match="need a GraphModule"):
        capture_activations(tiny_sr, images, ["add"])


def test_activation_stats_with_quantizer_range(tiny_sr, calib, images):
    gm = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib)
    stats = activation_stats(tiny_sr, images, ["blocks.1.0"], quant_model=gm, bins=64,
                             labels=["a", "b", "c"])["blocks.1.0"]
    assert (stats.images, stats.channels) == (3, 8)
    assert float(stats.hist.sum()) == stats.count == 3 * 8 * 10 * 10
    assert stats.lo == pytest.approx(float(stats.min.min())) and stats.hi == float(stats.max.max())
    q = gm.get_submodule("blocks_1_0_input_quantizer")
    lo, hi = stats.clip
    assert lo == pytest.approx(float((q.qmin - q.zero_point) * q.scale))
    assert hi == pytest.approx(float((q.qmax - q.zero_point) * q.scale))
    assert quantizer_range(gm, "blocks_1_0") == stats.clip  # node name works too
    assert quantizer_range(gm, "head") is None  # float layer: no quantizer in front
    assert 0.0 <= stats.clipped_fraction() <= 1.0
    assert "blocks.1.0 (input): 3 image(s) x 8 channels" in stats.summary()


def test_clipped_fraction_counts_values_outside_the_range(tiny_sr, images):
    stats = activation_stats(tiny_sr, images, ["head"], where="output", bins=200)["head"]
    assert stats.clipped_fraction() is None
    mid = (stats.lo + stats.hi) / 2
    stats.clip = (stats.lo - 1, mid)
    with torch.no_grad():
        values = tiny_sr.head(images)
    expected = float((values > mid).float().mean())
    assert stats.clipped_fraction() == pytest.approx(expected, abs=0.02)


def test_plots_render_png(tiny_sr, calib, images):
    pytest.importorskip("matplotlib")
    gm = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib)
    stats = activation_stats(tiny_sr, images, ["blocks.0.2"], quant_model=gm)["blocks.0.2"]
    png = figure_to_png(plot_activation(stats))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    plt = require_matplotlib()
    fig, (a, b) = plt.subplots(1, 2)
    plot_channel_ranges(stats, a, max_images=2, max_channels=4)
    plot_histogram(stats, b, log=False)
    assert len(a.collections) >= 2
    figure_to_png(fig)


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"fxquant\[viz\]"):
        require_matplotlib()
    with pytest.raises(ImportError):  # also an ImportError for callers that expect one
        require_matplotlib()
