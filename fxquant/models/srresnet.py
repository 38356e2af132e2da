"""SRResNet with batch normalisation (Ledig et al., CVPR 2017), as used for SR quantization.

Upstream: Cheeun/DAQ-pytorch (built on sanghyun-son/EDSR-PyTorch), ``src/model/srresnet.py``
(``SRResNet``) and ``src/model/common_srresnet.py`` (``ResBlock``, ``Upsampler``), full-precision
path (``quantize_w = quantize_a = 32``). Module names equal that state_dict: ``sub_mean``/``add_mean``
(1x1 convs that upstream builds but never calls; kept so its checkpoints load strictly),
``head.0`` (9x9 conv, no bias), ``head.1`` (PReLU), ``body.<i>.conv1/bn1/conv2/bn2`` (ReLU
between), ``body.16`` (conv), ``body.17`` (BN), ``tail.0.*`` (upsampler), ``tail.1`` (9x9 conv).
Convolutions have no bias. Defaults: 16 blocks, 64 features, ``rgb_range=255``.

Deviations: DAQ's upsampler is hard-wired to x4 (two (conv, PixelShuffle(2), PReLU) stages);
here x4 is exactly that, x2 is one such stage and x3 one (conv, PixelShuffle(3), PReLU) stage.
fxquant feeds RGB in [0, 1] and upstream works on [0, rgb_range], so ``forward`` multiplies the
input by ``rgb_range`` and divides the output by it (skipped when ``rgb_range == 1``). Each block
owns its ReLU (upstream shares one instance); no in-place ops. No other change was needed for
symbolic tracing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.models.edsr import default_conv, mean_shift


class ResBlock(nn.Module):
    def __init__(self, conv, n_feats: int, kernel_size: int, bias: bool = False):
        super().__init__()
        self.conv1 = conv(n_feats, n_feats, kernel_size, bias=bias)
        self.conv2 = conv(n_feats, n_feats, kernel_size, bias=bias)
        self.bn1 = nn.BatchNorm2d(n_feats)
        self.act = nn.ReLU()
        self.bn2 = nn.BatchNorm2d(n_feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        res = self.bn2(self.conv2(out))
        return res + x


class Upsampler(nn.Sequential):
    def __init__(self, conv, scale: int, n_feats: int):
        m: list[nn.Module] = []
        if scale in (2, 4):
            for _ in range(int(math.log(scale, 2))):
                m += [conv(n_feats, 4 * n_feats, 3, bias=False), nn.PixelShuffle(2), nn.PReLU()]
        elif scale == 3:
            m += [conv(n_feats, 9 * n_feats, 3, bias=False), nn.PixelShuffle(3), nn.PReLU()]
        else:
            raise ValueError(f"SRResNet supports scales 2, 3, 4, got {scale}")
        super().__init__(*m)


class SRResNet(nn.Module):
    def __init__(self, scale: int = 4, n_resblocks: int = 16, n_feats: int = 64, n_colors: int = 3,
                 rgb_range: float = 255, conv=default_conv):
        super().__init__()
        kernel_size = 3
        self.rgb_range = rgb_range
        self.sub_mean = mean_shift(rgb_range)
        self.add_mean = mean_shift(rgb_range, sign=1)
        self.head = nn.Sequential(conv(n_colors, n_feats, kernel_size=9, bias=False), nn.PReLU())
        m_body: list[nn.Module] = [ResBlock(conv, n_feats, kernel_size) for _ in range(n_resblocks)]
        m_body.append(conv(n_feats, n_feats, kernel_size, bias=False))
        m_body.append(nn.BatchNorm2d(n_feats))
        self.body = nn.Sequential(*m_body)
        self.tail = nn.Sequential(Upsampler(conv, scale, n_feats),
                                  conv(n_feats, n_colors, kernel_size=9, bias=False))
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d) and mod not in (self.sub_mean, self.add_mean):
                n = mod.kernel_size[0] * mod.kernel_size[1] * mod.out_channels
                mod.weight.data.normal_(0, math.sqrt(2.0 / n))
                if mod.bias is not None:
                    mod.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rgb_range != 1:
            x = x * self.rgb_range
        x = self.head(x)
        res = self.body(x)
        res = res + x
        x = self.tail(res)
        if self.rgb_range != 1:
            x = x / self.rgb_range
        return x
