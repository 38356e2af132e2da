"""Graph queries: post-ReLU (non-negative) detection and the upsampling tail, from the graph
alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.graph import conv_nodes, produces_nonnegative, select_layers, upsampling_tail
from fxquant.recipe import LayerConfig
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


class TwoStageTail(nn.Module):
    """Head, a residual body, a sub-pixel upsampler (conv, ReLU, pixel shuffle), an HR conv and
    the last conv; a bilinear skip of the input (PAN's) does not start the tail."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Conv2d(4, 16, 3, padding=1)
        self.hr = nn.Conv2d(4, 4, 3, padding=1)
        self.last = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        skip = nn.functional.interpolate(x, scale_factor=2, mode="bilinear")
        h = self.head(x)
        h = h + self.body(h)
        h = nn.functional.pixel_shuffle(torch.relu(self.up(h)), 2)
        return self.last(torch.relu(self.hr(h))) + skip


class PreUpsampled(nn.Module):
    """SRCNN/VDSR-style: the input is interpolated first, every conv runs at HR: no tail."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(nn.functional.interpolate(x, scale_factor=2))))


def test_the_upsampling_tail_starts_at_the_first_upsampling_op_after_a_conv():
    assert upsampling_tail(trace(TwoStageTail())) == {"up", "hr", "last"}
    assert upsampling_tail(trace(PreUpsampled())) == set()


@pytest.mark.parametrize("name, scale, tail", [
    ("pan", 4, {"upconv1", "att1_conv", "hrconv1", "upconv2", "att2_conv", "hrconv2", "conv_last"}),
    ("pan", 2, {"upconv1", "att1_conv", "hrconv1", "conv_last"}),
    ("carn_m", 4, {"upsample_up4_body_0", "upsample_up4_body_3", "exit_1", "add_mean_shifter"}),
    ("carn_m", 3, {"upsample_up3_body_0", "exit_1", "add_mean_shifter"}),
    ("edsr_baseline", 4, {"tail_0_0", "tail_0_2", "tail_1", "add_mean"}),
    ("imdn", 4, {"upsampler_0"}),
    ("fsrcnn", 2, {"last_part"}),
])
def test_the_zoo_models_upsampling_tails(name, scale, tail):
    """EDSR's ``tail`` (its upsampler and last conv) and the same part of the other networks."""
    from fxquant.models import build_model, get_spec

    model = build_model(name, scale)
    gm = trace(model, concrete_args={"scale": scale} if get_spec(name).takes_scale else None)
    assert upsampling_tail(gm) == tail


def test_tail_bits_select_the_tail_but_leave_a_float_last_conv_float():
    gm = trace(TwoStageTail())
    selection = select_layers(gm, LayerConfig(tail_bits=8))
    assert [n.name for n in selection.nodes] == ["body", "up", "hr"]
    assert selection.bits == {"up": 8, "hr": 8}
    both = select_layers(gm, LayerConfig(tail_bits=6, first_last_bits=8))
    assert both.bits == {"head": 8, "up": 6, "hr": 6, "last": 8}
    assert select_layers(gm, LayerConfig()).bits == {}
