"""EDSR and EDSR-baseline (Lim et al., CVPRW 2017).

Upstream: sanghyun-son/EDSR-PyTorch, ``src/model/edsr.py`` (``EDSR``) and ``src/model/common.py``
(``default_conv``, ``MeanShift``, ``ResBlock``, ``Upsampler``). Module names equal the upstream
state_dict keys: ``sub_mean``, ``head.0``, ``body.<i>.body.0/2``, ``body.<n_resblocks>``,
``tail.0.*`` (upsampler), ``tail.1``, ``add_mean``. Official configs: EDSR-baseline
``r16f64``, ``res_scale=1``; EDSR ``r32f256``, ``res_scale=0.1``; both ``rgb_range=255``.

Input/output convention: fxquant feeds RGB in [0, 1]. Upstream networks (and their checkpoints,
whose ``sub_mean``/``add_mean`` biases are ``-/+ rgb_range * mean``) work on [0, rgb_range], so
``forward`` multiplies the input by ``rgb_range`` and divides the output by it (skipped when
``rgb_range == 1``). Other deviations, none of which changes the numerics: ``MeanShift`` is built
as a plain ``nn.Conv2d`` (a traced leaf module, same keys); each residual block owns its ReLU
(upstream shares one instance, which would give every block the same module path in a traced
graph); the multiply by ``res_scale`` is omitted when ``res_scale == 1``; no in-place ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def default_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def mean_shift(rgb_range: float, rgb_mean=RGB_MEAN, rgb_std=(1.0, 1.0, 1.0), sign: int = -1) -> nn.Conv2d:
    """``common.MeanShift`` as a frozen plain 1x1 ``nn.Conv2d`` (identical parameters)."""
    conv = nn.Conv2d(3, 3, kernel_size=1)
    std = torch.Tensor(rgb_std)
    conv.weight.data = torch.eye(3).view(3, 3, 1, 1) / std.view(3, 1, 1, 1)
    conv.bias.data = sign * rgb_range * torch.Tensor(rgb_mean) / std
    for p in conv.parameters():
        p.requires_grad = False
    return conv


class ResBlock(nn.Module):
    """conv-ReLU-conv, scaled by ``res_scale``, plus identity."""

    def __init__(self, conv, n_feats: int, kernel_size: int, bias: bool = True, bn: bool = False,
                 res_scale: float = 1.0):
        super().__init__()
        m: list[nn.Module] = []
        for i in range(2):
            m.append(conv(n_feats, n_feats, kernel_size, bias=bias))
            if bn:
                m.append(nn.BatchNorm2d(n_feats))
            if i == 0:
                m.append(nn.ReLU())
        self.body = nn.Sequential(*m)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.body(x)
        if self.res_scale != 1:
            res = res.mul(self.res_scale)
        return res + x


class Upsampler(nn.Sequential):
    """``common.Upsampler`` without BN/activation: (conv, PixelShuffle(2)) x log2(s), or conv + PixelShuffle(3)."""

    def __init__(self, conv, scale: int, n_feats: int, bias: bool = True):
        m: list[nn.Module] = []
        if scale & (scale - 1) == 0:
            for _ in range(int(math.log(scale, 2))):
                m.append(conv(n_feats, 4 * n_feats, 3, bias))
                m.append(nn.PixelShuffle(2))
        elif scale == 3:
            m.append(conv(n_feats, 9 * n_feats, 3, bias))
            m.append(nn.PixelShuffle(3))
        else:
            raise ValueError(f"upsampler supports scales 2^n and 3, got {scale}")
        super().__init__(*m)


class EDSR(nn.Module):
    """``EDSR`` (defaults: the full r32f256 model, ``res_scale=0.1``, ``rgb_range=255``)."""

    def __init__(self, scale: int = 4, n_resblocks: int = 32, n_feats: int = 256, res_scale: float = 0.1,
                 n_colors: int = 3, rgb_range: float = 255, conv=default_conv):
        super().__init__()
        kernel_size = 3
        self.rgb_range = rgb_range
        self.sub_mean = mean_shift(rgb_range)
        self.add_mean = mean_shift(rgb_range, sign=1)
        self.head = nn.Sequential(conv(n_colors, n_feats, kernel_size))
        m_body: list[nn.Module] = [ResBlock(conv, n_feats, kernel_size, res_scale=res_scale)
                                   for _ in range(n_resblocks)]
        m_body.append(conv(n_feats, n_feats, kernel_size))
        self.body = nn.Sequential(*m_body)
        self.tail = nn.Sequential(Upsampler(conv, scale, n_feats), conv(n_feats, n_colors, kernel_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rgb_range != 1:
            x = x * self.rgb_range
        x = self.sub_mean(x)
        x = self.head(x)
        res = self.body(x)
        res = res + x
        x = self.tail(res)
        x = self.add_mean(x)
        if self.rgb_range != 1:
            x = x / self.rgb_range
        return x


class EDSRBaseline(EDSR):
    """EDSR-baseline: ``EDSR`` with the r16f64, ``res_scale=1`` defaults."""

    def __init__(self, scale: int = 4, n_resblocks: int = 16, n_feats: int = 64, res_scale: float = 1.0,
                 n_colors: int = 3, rgb_range: float = 255, conv=default_conv):
        super().__init__(scale=scale, n_resblocks=n_resblocks, n_feats=n_feats, res_scale=res_scale,
                         n_colors=n_colors, rgb_range=rgb_range, conv=conv)
