"""Integer input of a non-uniform quantizer whose levels lie on a uint8 grid (I²NQ with
``integer_grid = 8``): each value's half-step bucket on the grid is looked up in a per-row
table of uint8 grid codes (the code of the nearest level), and the ordinary u8 × int8
convolution reads those codes with the grid's scale and zero point. The buckets are computed
by the same function as the fake-quantizer's, so the codes are exactly the fake-quant
levels' grid codes. Under ``lower{compile=true}`` the table's gather gives way to the
branch-free search (fxquant/lower/search.py) of the input values where the bucket passes each
midpoint, which Inductor fuses and vectorizes: the same codes, ties included."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.lower.search import SearchedCodes, codes_by_search
from fxquant.quant.grid_buckets import bucket_table, bucket_thresholds, half_step_index
from fxquant.quant.table_lookup import lookup


class CodebookQuantize(SearchedCodes, nn.Module):
    """Float tensor → uint8 grid codes: ``table[c, searchsorted(midpoints[c], x)]``.

    State is the table, scale and zero point; the search's rows (:meth:`_derive`) are
    derived from the table, again on ``load_state_dict``."""

    def __init__(self, rows: int, count: int, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.bits, self.qmax, self.levels = 8, 255, count
        self.register_buffer("table", torch.zeros(rows, 2 ** (self.bits + 1), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        self.search_bits = max(1, math.ceil(math.log2(count)))
        self.choose_compiled_codes(self.search_bits)
        k = 2 ** self.search_bits
        self.register_buffer("thresholds", torch.zeros(k - 1, rows), persistent=False)
        self.register_buffer("level_codes", torch.zeros(k, rows), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._derive())

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
        module._derive()
        return module

    def _derive(self) -> None:
        """The search's rows from the table, scale and zero point: per row, each level's code
        in bucket order, and for the bucket before each level's first (the half-step
        midpoint ``m``) the input value ``t`` past which the bucket is above ``m``
        (:func:`~fxquant.quant.grid_buckets.bucket_thresholds`), so the search compares the
        input itself, with no division per value; rows with fewer distinct codes than
        ``2^search_bits`` are padded with midpoints above every bucket."""
        table = self.table.long()
        width = table.shape[1]
        mids = torch.full_like(self.thresholds, float(width))  # half steps; padding: none reached
        codes = torch.empty_like(self.level_codes)
        for row in range(table.shape[0]):
            starts = torch.cat([torch.zeros(1, dtype=torch.long),
                                (table[row, 1:] != table[row, :-1]).nonzero().flatten() + 1])
            if len(starts) > codes.shape[0]:
                raise ValueError(f"codebook row {row} has {len(starts)} levels; the module "
                                 f"holds at most {self.levels}")
            codes[:, row] = table[row, starts[-1]].float()
            codes[:len(starts), row] = table[row, starts].float()
            mids[:len(starts) - 1, row] = (starts[1:] - 1).float()
        self.thresholds.copy_(bucket_thresholds(mids, self.scale, self.zero_point, self.bits))
        self.level_codes.copy_(codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.searches(x.shape[1]):
            codes = codes_by_search(x, self.thresholds, self.level_codes, self.search_bits) \
                .to(torch.uint8)
        else:
            index = half_step_index(x, self.scale, self.zero_point, self.bits,
                                    self.table.shape[0])
            codes = lookup(self.table, index, x)
        return codes.contiguous(memory_format=torch.channels_last) if self.channels_last else codes

    def extra_repr(self) -> str:
        return (f"{self.levels} levels x {self.table.shape[0]} rows on u8 grid, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
                + (", NHWC" if self.channels_last else ""))
