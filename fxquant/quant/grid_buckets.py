"""The half-step buckets of a uint8 grid, through which non-uniform levels snapped onto the grid
(I²NQ with ``integer_grid = 8``: fxquant/quant/nonuniform.py) are looked up, by the
fake-quantizer and by its lowered codes (fxquant/lower/codebook.py) alike: a value's bucket
``h = clamp(ceil(x / (s/2)) + 2z, 0, 2^(b+1) − 1)``, the level of every bucket, and, for the
compiled codes' search, the input value at which the bucket passes a midpoint."""

from __future__ import annotations

import torch

from fxquant.quant.table_lookup import flat_index


def half_step_index(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                    rows: int) -> torch.Tensor:
    """Flat int32 index into a ``rows × 2^(b+1)`` bucket table for every element of ``x``
    (``N × C × ...``, row = channel, or row 0 for all when ``rows`` is 1), in ``x``'s memory
    order (:func:`~fxquant.quant.table_lookup.memory_order`).

    The bucket is ``h = clamp(ceil(x / (s/2)) + 2z, 0, 2^(b+1) − 1)``: which half-step of a
    ``bits``-bit grid ``x`` falls in; bucket h holds ``((h − 1 − 2z)·s/2, (h − 2z)·s/2]``.
    Every midpoint between two grid values is a bucket boundary, so the bucket decides the
    nearest level (:func:`bucket_table`). Computed in float32 in place
    (fxquant/quant/table_lookup.py). Shared by the fake-quantizer and the lowered lookup,
    which therefore pick the same level for the same input."""
    width = 2 ** (bits + 1)
    h = torch.ceil(x / (scale / 2))
    h.add_(2 * zero_point).clamp_(0, width - 1)
    if rows > 1:  # row offsets, exact in float32 while rows·width < 2^24
        h.add_(torch.arange(rows, device=x.device, dtype=h.dtype).mul_(width)
               .view((1, -1) + (1,) * (x.ndim - 2)))
    return flat_index(h, x)


def bucket_thresholds(mids: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      bits: int) -> torch.Tensor:
    """For integer half-step midpoints ``mids`` (any shape), the float32 ``t`` with bucket
    ``h > m`` (:func:`half_step_index`'s ``h``) exactly when ``x > t``, for every float32
    ``x``, the rounding of its division included: ``ceil(q) + 2z > m`` iff ``q > m − 2z``,
    and ``q = fl(x / (s/2))`` grows with ``x``, so ``t`` is the largest float whose quotient
    is at most ``m − 2z``, found from ``fl((m − 2z)·s/2)`` by a few ulp steps and checked.
    Midpoints at or past the last bucket (``2^(b+1) − 1``) are never passed: ``t = +inf``."""
    half = scale.float() / 2
    n = (mids.double() - 2 * float(zero_point)).float()  # small integers: exact
    t = n * half
    inf = torch.tensor(float("inf"))
    for _ in range(8):  # up while the next float's quotient stays at most n
        up = torch.nextafter(t, inf)
        t = torch.where(up / half <= n, up, t)
    for _ in range(8):  # down while the quotient is above n
        t = torch.where(t / half > n, torch.nextafter(t, -inf), t)
    if not (bool((t / half <= n).all()) and bool((torch.nextafter(t, inf) / half > n).all())):
        raise ArithmeticError("bucket thresholds did not settle within 8 ulps of m·s/2")
    return torch.where(mids >= 2 ** (bits + 1) - 1, inf, t)


def bucket_table(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``rows × 2^(b+1)``: the level index of every half-step bucket, for sorted grid codes
    ``codes`` (``rows × L``): bucket h → #{i : g_i + g_{i+1} < h} (the midpoint of grid values
    g_i, g_{i+1} is half-step g_i + g_{i+1}; ties go to the lower level)."""
    mids = (codes[:, :-1] + codes[:, 1:]).long()  # rows × (L − 1), in half steps
    h = torch.arange(2 ** (bits + 1), device=codes.device)
    return (mids.unsqueeze(1) < h.view(1, -1, 1)).sum(-1)
