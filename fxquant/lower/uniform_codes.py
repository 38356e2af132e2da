"""The boundary of an integer graph for a static uniform quantizer: float tensors to uint8
codes (:class:`IntegerQuantize`, :func:`quantize_codes`) and codes back to float
(:class:`IntegerDequantize`). The integer convs that read and emit those codes are in
fxquant/lower/conv.py."""

from __future__ import annotations

import torch
from torch import nn


def quantize_codes(x: torch.Tensor, scale: torch.Tensor | float,
                   zero_point: torch.Tensor | int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / s) + z, 0, qmax)`` as uint8: the codes the fake-quantizer rounds to.

    On a GPU torch divides by a Python number as ``x·(1/s)`` (its CUDA division kernel takes
    that shortcut for a CPU scalar), which can be an ulp from the IEEE quotient the reference
    rounds and flip a code at a near-tie; there a float ``scale`` becomes a device tensor
    first (a fill kernel, no host copy), which is divided exactly."""
    if x.is_cuda and not isinstance(scale, torch.Tensor):
        scale = torch.full((), scale, dtype=x.dtype, device=x.device)
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax).to(torch.uint8)


def _mirror_scalars(module: nn.Module) -> None:
    """Python copies of a per-tensor ``scale`` and ``zero_point`` buffer, which forward uses:
    ``lower{compile=true}`` then bakes them into Inductor's kernels as constants (IMDN ×4 at
    128×128: 24.7 → 23.7 ms, bit-identical) instead of loading them from memory after every
    store. The buffers stay the saved state; construction, ``from_quantizer`` and loading
    refresh the copies."""
    if module.scale.numel() == 1:
        module.scale_value = float(module.scale)
        module.zero_point_value = int(module.zero_point)


class IntegerQuantize(nn.Module):
    """Float tensor → uint8 codes of a static quantizer, per tensor or (a folded per-channel
    quantizer) per channel; one per quantized tensor, read by every integer conv that
    consumes it (NHWC for the ``cpu`` target)."""

    def __init__(self, bits: int, channels_last: bool, channels: int | None = None):
        super().__init__()
        self.bits, self.qmax, self.channels_last = bits, 2 ** bits - 1, channels_last
        self.channels = channels
        shape = () if channels is None else (1, channels, 1, 1)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))
        _mirror_scalars(self)

    @classmethod
    def from_quantizer(cls, quantizer, channels_last: bool) -> "IntegerQuantize":
        channels = quantizer.channels if getattr(quantizer, "folded", False) else None
        module = cls(quantizer.bits, channels_last, channels)
        with torch.no_grad():
            module.scale.copy_(quantizer.scale.detach().reshape(module.scale.shape))
            module.zero_point.copy_(quantizer.zero_point.detach().reshape(module.scale.shape).long())
        _mirror_scalars(module)
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        _mirror_scalars(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero_point = (self.scale, self.zero_point) if self.channels is not None \
            else (self.scale_value, self.zero_point_value)
        codes = quantize_codes(x, scale, zero_point, self.qmax)
        return codes.contiguous(memory_format=torch.channels_last) if self.channels_last else codes

    def extra_repr(self) -> str:
        where = ", NHWC" if self.channels_last else ""
        if self.channels is not None:
            return f"u{self.bits} codes, per-channel scale and zero point ({self.channels}){where}"
        return f"u{self.bits} codes, scale={float(self.scale):.4g}, " \
               f"zero_point={int(self.zero_point)}{where}"


class IntegerDequantize(nn.Module):
    """uint8 codes → ``(q − z)·s``, float32: the fake-quantizer's value, for the float ops
    that read a quantized conv output (``observe{outputs=true}``). Under ``lower{compile}``
    Inductor fuses it into the op that reads it, which then reads one byte per value."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int64))
        _mirror_scalars(self)

    @classmethod
    def from_quantizer(cls, quantizer) -> "IntegerDequantize":
        module = cls()
        with torch.no_grad():
            module.scale.copy_(quantizer.scale.detach().reshape(()))
            module.zero_point.copy_(quantizer.zero_point.detach().reshape(()).long())
        _mirror_scalars(module)
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        _mirror_scalars(self)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes.float() - self.zero_point_value) * self.scale_value

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}"
