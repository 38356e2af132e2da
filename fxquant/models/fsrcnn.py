"""FSRCNN (Dong et al., ECCV 2016), d=56, s=12, m=4, single (Y) channel.

Upstream: yjn870/FSRCNN-pytorch, ``models.py`` class ``FSRCNN(scale_factor, num_channels=1,
d=56, s=12, m=4)``. Module names equal the upstream state_dict keys. Upstream's weight
initialisation is kept. No deviation was needed for symbolic tracing.

Input and output are one channel: the BT.601 luma of 0..255 RGB, ``16 + (65.738 R + 129.057 G +
25.064 B) / 256``, divided by 255 and not rounded. (Upstream ``utils.convert_rgb_to_y`` writes
64.738 for R, a typo; the MANIFEST Set5 figures 37.100 / 32.587 / 30.505 are reproduced with the
standard 65.738, the network output clamped to [0, 1], x255 and rounded, against the unrounded
HR luma.)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FSRCNN(nn.Module):
    def __init__(self, scale_factor: int, num_channels: int = 1, d: int = 56, s: int = 12, m: int = 4):
        super().__init__()
        self.first_part = nn.Sequential(
            nn.Conv2d(num_channels, d, kernel_size=5, padding=5 // 2),
            nn.PReLU(d),
        )
        mid: list[nn.Module] = [nn.Conv2d(d, s, kernel_size=1), nn.PReLU(s)]
        for _ in range(m):
            mid.extend([nn.Conv2d(s, s, kernel_size=3, padding=3 // 2), nn.PReLU(s)])
        mid.extend([nn.Conv2d(s, d, kernel_size=1), nn.PReLU(d)])
        self.mid_part = nn.Sequential(*mid)
        self.last_part = nn.ConvTranspose2d(d, num_channels, kernel_size=9, stride=scale_factor,
                                            padding=9 // 2, output_padding=scale_factor - 1)
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        for mod in list(self.first_part) + list(self.mid_part):
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight.data, mean=0.0,
                                std=math.sqrt(2 / (mod.out_channels * mod.weight.data[0][0].numel())))
                nn.init.zeros_(mod.bias.data)
        nn.init.normal_(self.last_part.weight.data, mean=0.0, std=0.001)
        nn.init.zeros_(self.last_part.bias.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first_part(x)
        x = self.mid_part(x)
        return self.last_part(x)
