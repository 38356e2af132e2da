"""Nearest-level look-ups through a table, shared by the non-uniform (I²NQ) and subset (DFSQ)
quantizers and their lowered codes: a float index of integer values, flattened in the input's
memory order and cast once to int32, then one ``index_select`` (about 8× faster than a
comparison per level, and than int64 indices or ``torch.take``)."""

from __future__ import annotations

import torch


def memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation that puts a channels-last ``x`` in memory order (None for any other
    layout, flattened in logical order): the flat index and the looked-up values then keep
    channels-last, so the convs that read them need no conversion (``reconstruct`` and QAT
    train channels-last on CPU, tools/train_layout.py)."""
    if x.ndim == 4 and x.stride(1) == 1 and x.stride(3) > 1:  # channels innermost (also a
        return (0, 2, 3, 1)                                   # channel slice of such a tensor)
    return None


def flat_index(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float tensor of integer-valued table positions, one per element of ``like``, as the
    flat int32 index :func:`lookup` takes: flattened in ``like``'s memory order (the order
    :func:`lookup` restores, so the two always agree; no copy when ``index`` has ``like``'s
    layout, as an elementwise function of it does)."""
    order = memory_order(like)
    return (index if order is None else index.permute(order)).to(torch.int32).reshape(-1)


def lookup(table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table`` (flattened) at ``index`` (:func:`flat_index` for ``like``), in the shape and
    memory layout of ``like``."""
    values = torch.index_select(table.reshape(-1), 0, index)
    order = memory_order(like)
    if order is None:
        return values.reshape(like.shape)
    return values.reshape([like.shape[d] for d in order]).permute(0, 3, 1, 2)
