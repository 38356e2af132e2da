"""Integer input of a non-uniform quantizer whose levels lie on a uint8 grid (I²NQ with
``integer_grid = 8``): the nearest level's b-bit index is looked up in a per-row table of
uint8 grid codes, and the ordinary u8 × int8 convolution reads those codes with the grid's
scale and zero point. The lookup compares against the same float32 midpoints as the
fake-quantizer, so the codes are exactly the fake-quant levels' grid codes."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.quant.nonuniform import gather_levels, level_index
from fxquant.quant.subset import midpoints


class CodebookQuantize(nn.Module):
    """Float tensor → uint8 grid codes: ``table[c, searchsorted(midpoints[c], x)]``."""

    def __init__(self, rows: int, count: int, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.bits, self.qmax = 8, 255
        self.register_buffer("midpoints", torch.zeros(rows, count - 1))
        self.register_buffer("table", torch.zeros(rows, count, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_quantizer(cls, quantizer, channels_last: bool) -> "CodebookQuantize":
        grid = quantizer.integer_grid()
        if grid is None:
            raise ValueError("the quantizer's levels are not on an integer grid")
        levels = quantizer.levels.detach()
        module = cls(levels.shape[0], levels.shape[1], channels_last)
        with torch.no_grad():
            module.midpoints.copy_(midpoints(levels))
            module.table.copy_(quantizer.grid_levels.to(torch.uint8))
            module.scale.copy_(grid.scale)
            module.zero_point.copy_(grid.zero_point)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.table.expand(x.shape[1], -1)
        codes = gather_levels(level_index(x, self.midpoints), table)
        return codes.contiguous(memory_format=torch.channels_last) if self.channels_last else codes

    def extra_repr(self) -> str:
        return (f"{self.table.shape[1]} levels x {self.table.shape[0]} rows on u8 grid, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
                + (", NHWC" if self.channels_last else ""))
