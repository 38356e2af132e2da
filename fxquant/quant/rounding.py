"""Learned weight rounding for reconstruction: ``w' = w + s·tanh(v)`` before the weight
quantizer, ``v`` trained (initialised at 0: plain rounding). The offset spans ±1 step, so
every weight can move to either neighbouring grid point — also a weight already on the grid
(after FSWA's adjustment), which a ±½-step offset could never move. After training the
weights are replaced by their quantized values and ``v`` is dropped (:func:`bake`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxquant.quant.uniform import UniformQuantizer


class RoundingOffset(nn.Module):
    """The parametrization ``w ↦ w + s·tanh(v)`` of a QuantConv2d's weight (``s``: its
    weight quantizer's step, not trained through this path)."""

    def __init__(self, quantizer: UniformQuantizer, shape: torch.Size):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(shape))
        self._quantizer = [quantizer]  # a plain reference: not a submodule, not in state_dict

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self._quantizer[0].scale.detach() * torch.tanh(self.v)


def attach(conv: nn.Conv2d) -> nn.Parameter:
    """Give ``conv`` (a QuantConv2d with a uniform weight quantizer) a trainable rounding
    offset; returns ``v``."""
    offset = RoundingOffset(conv.weight_quantizer, conv.weight.shape)
    parametrize.register_parametrization(conv, "weight", offset)
    return offset.v


def bake(conv: nn.Conv2d) -> None:
    """Replace the parametrized weight by its quantized value (on the grid) and drop ``v``:
    the conv is an ordinary QuantConv2d again, and saves, loads and lowers as one."""
    parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
    with torch.no_grad():
        conv.weight.copy_(conv.weight_quantizer.fake_quant(conv.weight))
