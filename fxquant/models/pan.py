"""PAN: Pixel Attention Network (Zhao et al., ECCV 2020 workshops).

Upstream: zhaohengyuan1/PAN, ``codes/models/archs/PAN_arch.py`` (``PA``, ``PAConv``, ``SCPA``,
``PAN``) and ``codes/models/archs/arch_util.py`` (``make_layer``). Module names equal the
upstream state_dict keys.

Deviations, none of which changes the numerics: activations are not in-place, and the
in-place residual ``out += residual`` is written ``out = out + residual``. The nearest
``F.interpolate(scale_factor=...)`` upsampling and the bilinear global skip are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PA(nn.Module):
    """Pixel attention: ``x * sigmoid(conv1x1(x))``."""

    def __init__(self, nf: int):
        super().__init__()
        self.conv = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sigmoid(self.conv(x))
        return torch.mul(x, y)


class PAConv(nn.Module):
    """Pixel-attention convolution."""

    def __init__(self, nf: int, k_size: int = 3):
        super().__init__()
        self.k2 = nn.Conv2d(nf, nf, 1)
        self.sigmoid = nn.Sigmoid()
        self.k3 = nn.Conv2d(nf, nf, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)
        self.k4 = nn.Conv2d(nf, nf, kernel_size=k_size, padding=(k_size - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.sigmoid(self.k2(x))
        out = torch.mul(self.k3(x), y)
        return self.k4(out)


class SCPA(nn.Module):
    """Self-calibrated block with pixel attention."""

    def __init__(self, nf: int, reduction: int = 2, stride: int = 1, dilation: int = 1):
        super().__init__()
        group_width = nf // reduction
        self.conv1_a = nn.Conv2d(nf, group_width, kernel_size=1, bias=False)
        self.conv1_b = nn.Conv2d(nf, group_width, kernel_size=1, bias=False)
        self.k1 = nn.Sequential(
            nn.Conv2d(group_width, group_width, kernel_size=3, stride=stride, padding=dilation,
                      dilation=dilation, bias=False))
        self.PAConv = PAConv(group_width)
        self.conv3 = nn.Conv2d(group_width * reduction, nf, kernel_size=1, bias=False)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_a = self.lrelu(self.conv1_a(x))
        out_b = self.lrelu(self.conv1_b(x))
        out_a = self.lrelu(self.k1(out_a))
        out_b = self.lrelu(self.PAConv(out_b))
        out = self.conv3(torch.cat([out_a, out_b], dim=1))
        return out + x


class PAN(nn.Module):
    """``PAN(in_nc=3, out_nc=3, nf=40, unf=24, nb=16, scale=s)``; RGB in [0, 1]."""

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 40, unf: int = 24, nb: int = 16,
                 scale: int = 4):
        super().__init__()
        if scale not in (2, 3, 4):
            raise ValueError(f"PAN supports scales 2, 3, 4, got {scale}")
        self.scale = scale
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1, bias=True)
        self.SCPA_trunk = nn.Sequential(*[SCPA(nf=nf, reduction=2) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.upconv1 = nn.Conv2d(nf, unf, 3, 1, 1, bias=True)
        self.att1 = PA(unf)
        self.HRconv1 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
        if scale == 4:
            self.upconv2 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
            self.att2 = PA(unf)
            self.HRconv2 = nn.Conv2d(unf, unf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(unf, out_nc, 3, 1, 1, bias=True)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv_first(x)
        trunk = self.trunk_conv(self.SCPA_trunk(fea))
        fea = fea + trunk
        if self.scale == 4:
            fea = self.upconv1(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
            fea = self.upconv2(F.interpolate(fea, scale_factor=2, mode="nearest"))
            fea = self.lrelu(self.att2(fea))
            fea = self.lrelu(self.HRconv2(fea))
        else:
            fea = self.upconv1(F.interpolate(fea, scale_factor=self.scale, mode="nearest"))
            fea = self.lrelu(self.att1(fea))
            fea = self.lrelu(self.HRconv1(fea))
        out = self.conv_last(fea)
        ilr = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + ilr
