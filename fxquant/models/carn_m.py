"""CARN-M: the mobile Cascading Residual Network (Ahn et al., ECCV 2018), multi-scale.

Upstream: nmhkahn/CARN-pytorch, ``carn/model/carn_m.py`` (``Block``, ``Net``) and
``carn/model/ops.py`` (``MeanShift``, ``BasicBlock``, ``EResidualBlock``, ``UpsampleBlock``,
``_UpsampleBlock`` with grouped conv + PixelShuffle). The released ``carn_m.pth`` is
``Net(multi_scale=True, group=4)``; module names equal its state_dict keys. As upstream, each
cascading block applies its single efficient residual block ``b1`` three times (shared weights).

Deviations for symbolic tracing, none of which changes the numerics:

* ``UpsampleBlock.forward`` selects ``up2``/``up3``/``up4`` by a Python dict lookup on the
  concrete ``scale``; trace with ``torch.fx.symbolic_trace(net, concrete_args={"scale": s})``;
* activations are not in-place.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxquantError, TraceFailure

RGB_MEAN = (0.4488, 0.4371, 0.4040)


class MeanShift(nn.Module):
    """Adds (``sub=False``) or subtracts (``sub=True``) the DIV2K mean with a frozen 1x1 conv."""

    def __init__(self, mean_rgb=RGB_MEAN, sub: bool = True):
        super().__init__()
        sign = -1 if sub else 1
        self.shifter = nn.Conv2d(3, 3, 1, 1, 0)
        self.shifter.weight.data = torch.eye(3).view(3, 3, 1, 1)
        self.shifter.bias.data = torch.Tensor([m * sign for m in mean_rgb])
        for p in self.shifter.parameters():
            p.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shifter(x)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, ksize: int = 3, stride: int = 1,
                 pad: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, out_channels, ksize, stride, pad), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class EResidualBlock(nn.Module):
    """Efficient residual block: grouped 3x3, grouped 3x3, pointwise 1x1, residual ReLU."""

    def __init__(self, in_channels: int, out_channels: int, group: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, groups=group),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, groups=group),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + x)


class _UpsampleBlock(nn.Module):
    def __init__(self, n_channels: int, scale: int, group: int = 1):
        super().__init__()
        modules: list[nn.Module] = []
        if scale in (2, 4, 8):
            for _ in range(int(math.log(scale, 2))):
                modules += [nn.Conv2d(n_channels, 4 * n_channels, 3, 1, 1, groups=group), nn.ReLU(),
                            nn.PixelShuffle(2)]
        elif scale == 3:
            modules += [nn.Conv2d(n_channels, 9 * n_channels, 3, 1, 1, groups=group), nn.ReLU(),
                        nn.PixelShuffle(3)]
        else:
            raise ValueError(f"CARN upsampler supports scales 2, 3, 4, 8, got {scale}")
        self.body = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpsampleBlock(nn.Module):
    def __init__(self, n_channels: int, scale: int | None, multi_scale: bool, group: int = 1):
        super().__init__()
        self.multi_scale = multi_scale
        if multi_scale:
            self.up2 = _UpsampleBlock(n_channels, scale=2, group=group)
            self.up3 = _UpsampleBlock(n_channels, scale=3, group=group)
            self.up4 = _UpsampleBlock(n_channels, scale=4, group=group)
        else:
            self.up = _UpsampleBlock(n_channels, scale=scale, group=group)

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        if not self.multi_scale:
            return self.up(x)
        if isinstance(scale, torch.fx.Proxy):
            raise TraceFailure("CARN-M picks its upsampler from the Python value of `scale`: trace it "
                               "with torch.fx.symbolic_trace(net, concrete_args={'scale': s})")
        branches = {2: self.up2, 3: self.up3, 4: self.up4}
        if scale not in branches:
            raise FxquantError(f"CARN-M supports scales 2, 3, 4, got {scale!r}")
        return branches[scale](x)


class Block(nn.Module):
    """Cascading block: one EResidualBlock applied three times, 1x1 fusions c1..c3."""

    def __init__(self, in_channels: int = 64, out_channels: int = 64, group: int = 1):
        super().__init__()
        self.b1 = EResidualBlock(64, 64, group=group)
        self.c1 = BasicBlock(64 * 2, 64, 1, 1, 0)
        self.c2 = BasicBlock(64 * 3, 64, 1, 1, 0)
        self.c3 = BasicBlock(64 * 4, 64, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c0 = o0 = x
        b1 = self.b1(o0)
        c1 = torch.cat([c0, b1], dim=1)
        o1 = self.c1(c1)
        b2 = self.b1(o1)
        c2 = torch.cat([c1, b2], dim=1)
        o2 = self.c2(c2)
        b3 = self.b1(o2)
        c3 = torch.cat([c2, b3], dim=1)
        return self.c3(c3)


class Net(nn.Module):
    """``Net(multi_scale=True, group=4)``; ``forward(x, scale)``, RGB in [0, 1]."""

    def __init__(self, scale: int | None = None, multi_scale: bool = True, group: int = 4):
        super().__init__()
        self.sub_mean = MeanShift(RGB_MEAN, sub=True)
        self.add_mean = MeanShift(RGB_MEAN, sub=False)
        self.entry = nn.Conv2d(3, 64, 3, 1, 1)
        self.b1 = Block(64, 64, group=group)
        self.b2 = Block(64, 64, group=group)
        self.b3 = Block(64, 64, group=group)
        self.c1 = BasicBlock(64 * 2, 64, 1, 1, 0)
        self.c2 = BasicBlock(64 * 3, 64, 1, 1, 0)
        self.c3 = BasicBlock(64 * 4, 64, 1, 1, 0)
        self.upsample = UpsampleBlock(64, scale=scale, multi_scale=multi_scale, group=group)
        self.exit = nn.Conv2d(64, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        x = self.sub_mean(x)
        x = self.entry(x)
        c0 = o0 = x
        b1 = self.b1(o0)
        c1 = torch.cat([c0, b1], dim=1)
        o1 = self.c1(c1)
        b2 = self.b2(o1)
        c2 = torch.cat([c1, b2], dim=1)
        o2 = self.c2(c2)
        b3 = self.b3(o2)
        c3 = torch.cat([c2, b3], dim=1)
        o3 = self.c3(c3)
        out = self.upsample(o3, scale=scale)
        out = self.exit(out)
        return self.add_mean(out)
