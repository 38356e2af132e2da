"""The conv of a constant plane with zero padding, computed separably: its interior value
everywhere, plus a correction on the border strips where some tap lands in the padding.

The folded convs of the dynamic quantizers (fxquant/lower/folded.py: each channel's offset
``β_c``) and the uniform convs with per-channel input zero points (fxquant/lower/conv.py)
both need it. With the tap masks ``R`` (rows, k_h × out_h) and ``C`` (columns, k_w × out_w),
``M[i, y] = 1`` when tap ``i`` of output ``y`` lands inside the input, the plane is
``Σ_ij V_ij R_iy C_jx``; writing ``R = 1 + R'`` and ``C = 1 + C'`` (``R'``, ``C'`` nonzero on
border rows and columns only) splits it into the interior value ``Σ_ij V_ij`` and
``Σ_i (Σ_j V_ij) R'_iy + Σ_j (Σ_i V_ij) C'_jx + Σ_ij V_ij R'_iy C'_jx`` on the strips.

The masks and the strips depend only on the conv's geometry and the input size, so
:class:`BorderTaps` keeps them per size: the per-call work is then a few small matmuls and
in-place adds on slices of the output (the strips are runs of consecutive rows or columns).
The uniform convs keep their masks the same way; they find the strips per call (under
``lower{compile=true}`` Dynamo traces them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def border_masks(size: int, out_size: int, kernel: int, stride: int, padding: int,
                 dilation: int, dtype, device) -> torch.Tensor:
    """``M[i, y] = 1`` when tap ``i`` of output ``y`` lands inside the input (kernel × out)."""
    pos = (torch.arange(out_size, device=device) * stride - padding).view(1, -1) \
        + (torch.arange(kernel, device=device) * dilation).view(-1, 1)
    return ((pos >= 0) & (pos < size)).to(dtype)


Runs = tuple[tuple[int, int, int], ...]  # (first output index, end, its column in the taps)


@dataclass(frozen=True)
class BorderStrips:
    """The output rows and columns some tap of which lands in the zero padding, as runs of
    consecutive indices, and the masks' corrections ``R' = R − 1``, ``C' = C − 1`` on them
    (k × the strips' rows or columns)."""

    rows: Runs
    cols: Runs
    row_taps: torch.Tensor
    col_taps: torch.Tensor


def _runs(indices: list[int]) -> Runs:
    runs, j = [], 0
    while j < len(indices):
        end = j + 1
        while end < len(indices) and indices[end] == indices[end - 1] + 1:
            end += 1
        runs.append((indices[j], indices[end - 1] + 1, j))
        j = end
    return tuple(runs)


def border_strips(rows: torch.Tensor, cols: torch.Tensor) -> BorderStrips:
    """The :class:`BorderStrips` of tap masks ``rows`` and ``cols`` (a host read)."""
    rb, cb = ((mask != 1).any(0).nonzero().flatten() for mask in (rows, cols))
    return BorderStrips(_runs(rb.tolist()), _runs(cb.tolist()), (rows - 1)[:, rb],
                        (cols - 1)[:, cb])


def add_border(y: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               strips: BorderStrips | None = None) -> torch.Tensor:
    """Add the border correction of the plane ``Σ_ij V_ij R_iy C_jx`` (``v``: N×O×k_h×k_w) to
    ``y``, which holds its interior value ``Σ_ij V_ij``, in place on the strips only (module
    doc). ``strips``: :func:`border_strips` of ``rows`` and ``cols``, found here when None."""
    strips = strips if strips is not None else border_strips(rows, cols)
    if strips.rows:
        row_term = v.sum(3) @ strips.row_taps  # N×O×rows (matmul: einsum's Python costs more)
        for start, end, j in strips.rows:
            y[:, :, start:end, :] += row_term[:, :, j:j + end - start, None]
    if strips.cols:
        col_term = v.sum(2) @ strips.col_taps
        for start, end, j in strips.cols:
            y[:, :, :, start:end] += col_term[:, :, None, j:j + end - start]
    if strips.rows and strips.cols:
        corner = strips.row_taps.t() @ v @ strips.col_taps  # N×O×rows×cols
        for r0, r1, rj in strips.rows:
            for c0, c1, cj in strips.cols:
                y[:, :, r0:r1, c0:c1] += corner[:, :, rj:rj + r1 - r0, cj:cj + c1 - c0]
    return y


def _size_key(size, dtype, device) -> tuple:
    return tuple(int(s) for s in size), dtype, str(device)


class BorderTaps:
    """For a conv module with ``kernel_size``, ``stride``, ``padding`` and ``dilation``: its tap
    masks and border strips for an input size, made once per (size, dtype, device) and kept
    on the module (not in its state: they follow from the geometry)."""

    def tap_masks(self, size, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, cols)`` for inputs of spatial ``size`` (h, w); made afresh while
        torch.compile or torch.export traces the call (a traced tensor must not be kept)."""
        if torch.compiler.is_compiling():
            return self._make_masks(size, dtype, device)
        key = _size_key(size, dtype, device)
        cache = self.__dict__.setdefault("_tap_masks", {})
        if key not in cache:
            cache[key] = self._make_masks(size, dtype, device)
        return cache[key]

    def strips(self, size, dtype, device) -> BorderStrips:
        """:func:`border_strips` of the tap masks for ``size`` (a host read the first time:
        eager callers only)."""
        key = _size_key(size, dtype, device)
        cache = self.__dict__.setdefault("_border_strips", {})
        if key not in cache:
            cache[key] = border_strips(*self.tap_masks(size, dtype, device))
        return cache[key]

    def _make_masks(self, size, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        masks = []
        for i in range(2):
            k, st, p, d = self.kernel_size[i], self.stride[i], self.padding[i], self.dilation[i]
            out = (size[i] + 2 * p - d * (k - 1) - 1) // st + 1  # symbolic under export
            masks.append(border_masks(size[i], out, k, st, p, d, dtype, device))
        return masks[0], masks[1]
