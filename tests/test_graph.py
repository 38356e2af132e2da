"""Graph queries: post-ReLU (non-negative) detection from the graph alone."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.graph import conv_nodes, produces_nonnegative
from fxquant.tracing import trace


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.after_relu = nn.Conv2d(4, 4, 3, padding=1)
        self.after_shuffle_cat = nn.Conv2d(2, 4, 1)
        self.after_leaky = nn.Conv2d(4, 4, 1)
        self.after_residual = nn.Conv2d(4, 4, 1)
        self.after_neg_scale = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.a(x)
        r = self.relu(h)
        y1 = self.after_relu(r)
        s = torch.cat([nn.functional.pixel_shuffle(r, 2), torch.relu(
            nn.functional.pixel_shuffle(h, 2))], dim=1)
        y2 = self.after_shuffle_cat(s[:, :2])
        y3 = self.after_leaky(nn.functional.leaky_relu(h, 0.05))
        y4 = self.after_residual(h + r)
        y5 = self.after_neg_scale(r * -1.0)
        return y1, y2, y3, y4, y5


def test_post_relu_inputs_are_found_from_the_graph():
    gm = trace(Branches())
    flags = {str(n.target): produces_nonnegative(gm, n.args[0]) for n in conv_nodes(gm)}
    assert flags == {"a": False, "after_relu": True, "after_shuffle_cat": True,
                     "after_leaky": False, "after_residual": False, "after_neg_scale": False}


def test_mean_shift_convs_are_not_first_or_last_and_stay_float():
    from fxquant.graph import select_layers
    from fxquant.models import build_model
    from fxquant.recipe import LayerConfig

    gm = trace(build_model("edsr_baseline", 2))
    selection = select_layers(gm, LayerConfig())
    chosen = [str(n.target) for n in selection.nodes]
    assert "head.0" not in chosen and "tail.1" not in chosen
    assert "sub_mean" not in chosen and "add_mean" not in chosen
    assert "mean shift" in selection.skipped["sub_mean"]
    assert "first/last" in selection.skipped["head_0"] and "first/last" in selection.skipped["tail_1"]
    assert chosen[0] == "body.0.body.0" and chosen[-1] == "tail.0.0"
    assert len(chosen) == 16 * 2 + 1 + 1  # block convs, body.16, the x2 upsampler conv
