"""Layers whose weights pass through a quantizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.quant.base import Quantizer


class QuantConv2d(nn.Conv2d):
    """A ``Conv2d`` that fake-quantizes its weight on every call (bias stays FP).

    It owns copies of the original conv's parameters (training or lowering the compiled
    model never touches the user's float model); state_dict keys keep the upstream names
    (``<conv>.weight``, ``<conv>.bias``) plus ``<conv>.weight_quantizer.*``.
    """

    def __init__(self, conv: nn.Conv2d, weight_quantizer: Quantizer):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size,
                         stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                         groups=conv.groups, bias=conv.bias is not None,
                         padding_mode=conv.padding_mode, device="meta")
        self.weight = nn.Parameter(conv.weight.detach().clone(),
                                   requires_grad=conv.weight.requires_grad)
        self.bias = None if conv.bias is None else nn.Parameter(
            conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
        self.weight_quantizer = weight_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


def conv_input_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """The pads ``conv`` gives its input, in ``F.pad``'s order (left, right, top, bottom):
    numbers, ``'valid'`` and ``'same'`` (which pads the right/bottom one more where the
    kernel's reach is odd) alike."""
    return tuple(int(p) for p in conv._reversed_padding_repeated_twice)


def pad_like(x: torch.Tensor, pads, padding_mode: str) -> torch.Tensor:
    """``x`` padded by ``pads`` (``F.pad``'s order) as a conv of ``padding_mode`` pads."""
    return F.pad(x, tuple(pads), mode="constant" if padding_mode == "zeros" else padding_mode)


def padded_like_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it, for computations over the conv's receptive fields
    that then run unpadded (``F.unfold``)."""
    return pad_like(x, conv_input_pads(conv), conv.padding_mode)


def swap_in_quant_conv(root: nn.Module, target: str, weight_quantizer: Quantizer) -> QuantConv2d:
    """Replace submodule ``target`` of ``root`` (a Conv2d) by a QuantConv2d in place."""
    parent_name, _, child = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    conv = getattr(parent, child)
    quant = QuantConv2d(conv, weight_quantizer)
    quant.train(conv.training)
    setattr(parent, child, quant)
    return quant
