"""A conv's padding in its integer form, for every lowered conv (uniform, I²NQ, DAQ, DFSQ;
all targets).

Zero padding stays the conv's own, as numbers (``padding='same'`` and ``'valid'`` resolved):
the integer kernels pad the codes' difference from the zero point, which is ``x̂ = 0``, and
DAQ's/DFSQ's folded convs correct the offset term on the border strips
(fxquant/lower/folded.py).

Any other ``padding_mode`` (``reflect``, ``replicate``, ``circular``) pads with copies of
the input's own values, channel by channel, so it commutes with quantization, whose codes
are per value given the channel's (and image's) step: padding ``x̂ = Δ·q + β`` that way is
``Δ·pad(q) + β``. The lowered conv pads its input codes with the mode
(:func:`pad_codes`) and runs unpadded: exact on every target, and no border term is left
(a padded constant plane is constant).
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.quant.layers import conv_input_pads, pad_like

Pads = tuple[int, int, int, int]  # F.pad's order for the last two dims: left, right, top, bottom


def lowered_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], Pads | None, str]:
    """``(padding, pre_pad, mode)`` of ``conv``'s integer form: the kernel's own symmetric
    ``padding`` (rows, columns), and the pads its input codes get first (None for zero
    padding) with their ``mode``."""
    from fxquant.lower.conv import LoweringError  # conv imports this module

    left, right, top, bottom = conv_input_pads(conv)
    if conv.padding_mode != "zeros":
        return (0, 0), (left, right, top, bottom), conv.padding_mode
    if left != right or top != bottom:
        raise LoweringError(
            f"padding={conv.padding!r} with kernel {tuple(conv.kernel_size)} and dilation "
            f"{tuple(conv.dilation)} pads the bottom/right one more than the top/left "
            f"({top}/{bottom} rows, {left}/{right} columns); the integer kernels pad zeros "
            "symmetrically: give the conv an odd kernel, or explicit numbers")
    return (top, left), None, "zeros"


def pad_codes(codes, pre_pad: Pads | None, mode: str):
    """``codes`` (a tensor, or a list of code planes) padded by ``pre_pad`` with ``mode``,
    keeping an NHWC tensor NHWC; unchanged when ``pre_pad`` is None."""
    if pre_pad is None:
        return codes
    if isinstance(codes, (list, tuple)):
        return [pad_codes(plane, pre_pad, mode) for plane in codes]
    nhwc = codes.dim() == 4 and not codes.is_contiguous() \
        and codes.is_contiguous(memory_format=torch.channels_last)
    padded = pad_like(codes, pre_pad, mode)
    return padded.contiguous(memory_format=torch.channels_last) if nhwc else padded
