"""Integer input of a non-uniform quantizer whose levels lie on a uint8 grid (I²NQ with
``integer_grid = 8``): each value's half-step bucket on the grid is looked up in a per-row
table of uint8 grid codes (the code of the nearest level), and the ordinary u8 × int8
convolution reads those codes with the grid's scale and zero point. The buckets are computed
by the same function as the fake-quantizer's, so the codes are exactly the fake-quant
levels' grid codes."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.quant.nonuniform import bucket_table, half_step_index
from fxquant.quant.table_lookup import lookup


class CodebookQuantize(nn.Module):
    """Float tensor → uint8 grid codes: ``table[c, searchsorted(midpoints[c], x)]``."""

    def __init__(self, rows: int, count: int, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.bits, self.qmax, self.levels = 8, 255, count
        self.register_buffer("table", torch.zeros(rows, 2 ** (self.bits + 1), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))

    @classmethod
    def from_quantizer(cls, quantizer, channels_last: bool) -> "CodebookQuantize":
        grid = quantizer.integer_grid()
        if grid is None:
            raise ValueError("the quantizer's levels are not on an integer grid")
        if grid.bits != 8:
            raise ValueError(f"the int8 path reads 8-bit codes; these levels are on a "
                             f"{grid.bits}-bit grid")
        codes = quantizer.grid_levels.long()
        module = cls(codes.shape[0], codes.shape[1], channels_last)
        with torch.no_grad():  # bucket → its level's grid code
            module.table.copy_(torch.gather(codes, 1, bucket_table(codes, 8)).to(torch.uint8))
            module.scale.copy_(grid.scale)
            module.zero_point.copy_(grid.zero_point)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = half_step_index(x, self.scale, self.zero_point, self.bits, self.table.shape[0])
        codes = lookup(self.table, index, x)
        return codes.contiguous(memory_format=torch.channels_last) if self.channels_last else codes

    def extra_repr(self) -> str:
        return (f"{self.levels} levels x {self.table.shape[0]} rows on u8 grid, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
                + (", NHWC" if self.channels_last else ""))
