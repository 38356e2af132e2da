"""RDN: Residual Dense Network (Zhang et al., CVPR 2018).

Upstream: sanghyun-son/EDSR-PyTorch, ``src/model/rdn.py`` (``RDB_Conv``, ``RDB``, ``RDN``). Module
names equal the upstream state_dict keys: ``SFENet1``, ``SFENet2``, ``RDBs.<i>.convs.<j>.conv.0``,
``RDBs.<i>.LFF``, ``GFF.0/1``, ``UPNet.*``. Defaults are the official config B (``G0=64``,
``D=16``, ``C=8``, ``G=64``, ``kSize=3``, ``rgb_range=255``); ``D``/``C``/``G`` may be overridden
(e.g. for small test networks).

Input/output convention: fxquant feeds RGB in [0, 1]; upstream RDN is trained on [0, rgb_range]
(it has no mean shift), so ``forward`` multiplies the input by ``rgb_range`` and divides the
output by it (skipped when ``rgb_range == 1``). The in-place ``x += f__1`` is written out-of-place.
No other deviation was needed for symbolic tracing.
"""

from __future__ import annotations

import torch
from torch import nn

CONFIGS = {"A": (20, 6, 32), "B": (16, 8, 64)}


class RDB_Conv(nn.Module):
    def __init__(self, in_channels: int, grow_rate: int, kSize: int = 3):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, grow_rate, kSize, padding=(kSize - 1) // 2, stride=1),
                                  nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.conv(x)), 1)


class RDB(nn.Module):
    """Residual dense block: C densely connected convs, 1x1 local fusion, local residual."""

    def __init__(self, growRate0: int, growRate: int, nConvLayers: int, kSize: int = 3):
        super().__init__()
        G0, G, C = growRate0, growRate, nConvLayers
        self.convs = nn.Sequential(*[RDB_Conv(G0 + c * G, G, kSize) for c in range(C)])
        self.LFF = nn.Conv2d(G0 + C * G, G0, 1, padding=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LFF(self.convs(x)) + x


class RDN(nn.Module):
    def __init__(self, scale: int = 2, G0: int = 64, kSize: int = 3, config: str = "B",
                 n_colors: int = 3, rgb_range: float = 255, D: int | None = None, C: int | None = None,
                 G: int | None = None):
        super().__init__()
        if config not in CONFIGS:
            raise ValueError(f"RDN config must be one of {sorted(CONFIGS)}, got {config!r}")
        d, c, g = CONFIGS[config]
        self.D = D if D is not None else d
        C = C if C is not None else c
        G = G if G is not None else g
        self.rgb_range = rgb_range
        pad = (kSize - 1) // 2
        self.SFENet1 = nn.Conv2d(n_colors, G0, kSize, padding=pad, stride=1)
        self.SFENet2 = nn.Conv2d(G0, G0, kSize, padding=pad, stride=1)
        self.RDBs = nn.ModuleList([RDB(growRate0=G0, growRate=G, nConvLayers=C, kSize=kSize)
                                   for _ in range(self.D)])
        self.GFF = nn.Sequential(nn.Conv2d(self.D * G0, G0, 1, padding=0, stride=1),
                                 nn.Conv2d(G0, G0, kSize, padding=pad, stride=1))
        if scale in (2, 3):
            self.UPNet = nn.Sequential(
                nn.Conv2d(G0, G * scale * scale, kSize, padding=pad, stride=1),
                nn.PixelShuffle(scale),
                nn.Conv2d(G, n_colors, kSize, padding=pad, stride=1))
        elif scale == 4:
            self.UPNet = nn.Sequential(
                nn.Conv2d(G0, G * 4, kSize, padding=pad, stride=1),
                nn.PixelShuffle(2),
                nn.Conv2d(G, G * 4, kSize, padding=pad, stride=1),
                nn.PixelShuffle(2),
                nn.Conv2d(G, n_colors, kSize, padding=pad, stride=1))
        else:
            raise ValueError(f"RDN scale must be 2, 3 or 4, got {scale}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rgb_range != 1:
            x = x * self.rgb_range
        f__1 = self.SFENet1(x)
        x = self.SFENet2(f__1)
        rdbs_out = []
        for rdb in self.RDBs:
            x = rdb(x)
            rdbs_out.append(x)
        x = self.GFF(torch.cat(rdbs_out, 1))
        x = x + f__1
        x = self.UPNet(x)
        if self.rgb_range != 1:
            x = x / self.rgb_range
        return x
