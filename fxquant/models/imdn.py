"""IMDN: Information Multi-Distillation Network (Hui et al., ACM MM 2019).

Upstream: Zheng222/IMDN, ``model/architecture.py`` class ``IMDN`` and ``model/block.py``
(``IMDModule``, ``CCALayer``, ``conv_layer``, ``conv_block``, ``pixelshuffle_block``).
Module names equal the upstream state_dict keys (the released checkpoints add a ``module.``
prefix, which :func:`fxquant.models.checkpoint.load_checkpoint` strips).

Deviations, none of which changes the numerics:

* the ``assert F.dim() == 4`` checks in ``mean_channels``/``stdv_channels`` are dropped
  (``bool`` of a traced value is not symbolically traceable);
* activations are not in-place (in-place ops on shared tensors get in the way of graph passes);
* the contrast term's square root has a finite gradient at a variance of 0 (:func:`safe_sqrt`:
  same values, and QAT of a model whose quantization makes a channel constant stays finite).

The channel split keeps ``torch.split`` with the constant sizes (16, 48), and the contrast
term keeps upstream's ``sum / (H * W)`` formulation, so outputs are bit-identical to upstream.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_layer(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
               dilation: int = 1, groups: int = 1) -> nn.Conv2d:
    padding = int((kernel_size - 1) / 2) * dilation
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=padding, bias=True,
                     dilation=dilation, groups=groups)


def mean_channels(x: torch.Tensor) -> torch.Tensor:
    spatial_sum = x.sum(3, keepdim=True).sum(2, keepdim=True)
    return spatial_sum / (x.size(2) * x.size(3))


def stdv_channels(x: torch.Tensor) -> torch.Tensor:
    x_mean = mean_channels(x)
    x_variance = (x - x_mean).pow(2).sum(3, keepdim=True).sum(2, keepdim=True) / (x.size(2) * x.size(3))
    return safe_sqrt(x_variance)


def safe_sqrt(variance: torch.Tensor) -> torch.Tensor:
    """``variance.pow(0.5)``, bit for bit, with a finite gradient at 0.

    The square root's derivative is infinite at 0, and a channel that quantization makes
    constant (common at 2 bits) has a variance of exactly 0: upstream's ``pow(0.5)`` then turns
    every gradient of a QAT step into NaN. Where the variance is not positive this passes the
    variance through (0 stays 0, NaN stays NaN) with gradient 1; the ``where`` inside keeps the
    unused square-root branch off 0, so no infinity reaches the backward pass."""
    spread = variance > 0
    root = torch.where(spread, variance, torch.ones_like(variance)).pow(0.5)
    return torch.where(spread, root, variance)


class CCALayer(nn.Module):
    """Contrast-aware channel attention."""

    def __init__(self, channel: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channel, channel // reduction, 1, padding=0, bias=True),
            nn.ReLU(),
            nn.Conv2d(channel // reduction, channel, 1, padding=0, bias=True),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = stdv_channels(x) + self.avg_pool(x)
        y = self.conv_du(y)
        return x * y


class IMDModule(nn.Module):
    """Information multi-distillation block."""

    def __init__(self, in_channels: int, distillation_rate: float = 0.25):
        super().__init__()
        self.distilled_channels = int(in_channels * distillation_rate)
        self.remaining_channels = int(in_channels - self.distilled_channels)
        self.c1 = conv_layer(in_channels, in_channels, 3)
        self.c2 = conv_layer(self.remaining_channels, in_channels, 3)
        self.c3 = conv_layer(self.remaining_channels, in_channels, 3)
        self.c4 = conv_layer(self.remaining_channels, self.distilled_channels, 3)
        self.act = nn.LeakyReLU(0.05)
        self.c5 = conv_layer(in_channels, in_channels, 1)
        self.cca = CCALayer(self.distilled_channels * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = (self.distilled_channels, self.remaining_channels)
        out_c1 = self.act(self.c1(x))
        distilled_c1, remaining_c1 = torch.split(out_c1, sizes, dim=1)
        out_c2 = self.act(self.c2(remaining_c1))
        distilled_c2, remaining_c2 = torch.split(out_c2, sizes, dim=1)
        out_c3 = self.act(self.c3(remaining_c2))
        distilled_c3, remaining_c3 = torch.split(out_c3, sizes, dim=1)
        out_c4 = self.c4(remaining_c3)
        out = torch.cat([distilled_c1, distilled_c2, distilled_c3, out_c4], dim=1)
        return self.c5(self.cca(out)) + x


class IMDN(nn.Module):
    """``IMDN(in_nc=3, nf=64, num_modules=6, out_nc=3, upscale=s)``; RGB in [0, 1]."""

    def __init__(self, in_nc: int = 3, nf: int = 64, num_modules: int = 6, out_nc: int = 3,
                 upscale: int = 4):
        super().__init__()
        if num_modules != 6:
            # Upstream hard-codes six named blocks IMDB1..IMDB6 (and the fusion conv's width).
            raise ValueError(f"IMDN has exactly 6 IMD modules (IMDB1..IMDB6), got {num_modules}")
        self.fea_conv = conv_layer(in_nc, nf, kernel_size=3)
        self.IMDB1 = IMDModule(in_channels=nf)
        self.IMDB2 = IMDModule(in_channels=nf)
        self.IMDB3 = IMDModule(in_channels=nf)
        self.IMDB4 = IMDModule(in_channels=nf)
        self.IMDB5 = IMDModule(in_channels=nf)
        self.IMDB6 = IMDModule(in_channels=nf)
        # conv_block(nf * num_modules, nf, kernel_size=1, act_type='lrelu') -> Sequential(conv, lrelu)
        self.c = nn.Sequential(nn.Conv2d(nf * num_modules, nf, 1, 1, 0, bias=True), nn.LeakyReLU(0.05))
        self.LR_conv = conv_layer(nf, nf, kernel_size=3)
        # pixelshuffle_block(nf, out_nc, upscale) -> Sequential(conv, PixelShuffle)
        self.upsampler = nn.Sequential(conv_layer(nf, out_nc * upscale ** 2, 3), nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_fea = self.fea_conv(x)
        out_b1 = self.IMDB1(out_fea)
        out_b2 = self.IMDB2(out_b1)
        out_b3 = self.IMDB3(out_b2)
        out_b4 = self.IMDB4(out_b3)
        out_b5 = self.IMDB5(out_b4)
        out_b6 = self.IMDB6(out_b5)
        out_b = self.c(torch.cat([out_b1, out_b2, out_b3, out_b4, out_b5, out_b6], dim=1))
        out_lr = self.LR_conv(out_b) + out_fea
        return self.upsampler(out_lr)
