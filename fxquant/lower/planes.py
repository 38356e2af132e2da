"""The uint8 planes of integer codes, ``q = Σ_k 256^k·plane_k``: how the cpu target's
folded convs (fxquant/lower/folded.py) take codes wider than a byte."""

from __future__ import annotations

import torch

from fxquant.lower.conv import LoweringError

U8_MAX = 255


def code_planes(codes) -> list[torch.Tensor]:
    """The uint8 planes of a codes value: uint8 codes are one plane, a list is planes
    already (DFSQ on cpu), other integer-valued codes are split (:func:`split_planes`)."""
    if isinstance(codes, (list, tuple)):
        return list(codes)
    return [codes] if codes.dtype == torch.uint8 else split_planes(codes)


def plane_shape(codes) -> torch.Size:
    """The shape of a codes value's planes (all share it)."""
    return (codes[0] if isinstance(codes, (list, tuple)) else codes).shape


def code_values(codes) -> torch.Tensor:
    """The integer codes ``Σ_k 256^k·plane_k`` of a codes value (int64), for checks."""
    if not isinstance(codes, (list, tuple)):
        return codes.long()
    return sum(p.long() << (8 * k) for k, p in enumerate(codes))


def split_planes(codes: torch.Tensor) -> list[torch.Tensor]:
    """Non-negative integer-valued codes (float32 exact below 2^24, or int) → uint8 planes
    ``q = Σ_k 256^k·plane_k`` (NHWC kept)."""
    top = float(codes.max()) if codes.numel() else 0.0
    if codes.is_floating_point() and top >= 2 ** 24:
        raise LoweringError(f"DAQ relu-branch code {top:.0f} is beyond 2^24: the input is too "
                            "large against its channel's step for the cpu target")
    rest = codes.to(torch.int32)
    planes, top = [], int(top)
    while True:
        planes.append((rest & U8_MAX).to(torch.uint8))
        rest = rest >> 8
        top >>= 8
        if top == 0:
            return [p.contiguous(memory_format=torch.channels_last) for p in planes]
