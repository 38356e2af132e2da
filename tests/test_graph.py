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
