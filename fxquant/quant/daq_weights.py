"""DAQ's weight quantizer (Hong et al., WACV 2022; the math in :mod:`fxquant.quant.daq`):
σ-scaled symmetric mid-rise levels, ``Δ = s·σ_w·γ`` with σ_w the weight's std per tensor
(official) or per output channel, ``s`` from the Gaussian step table and ``γ`` a step
multiplier (1 = official; reconstruction learns it); per-input-channel bits for mixed
precision."""

from __future__ import annotations

from typing import Sequence

import torch

from fxquant.quant.base import (
    AffineCodes,
    Quantizer,
    StepMultiplierMixin,
    check_multiplier,
)
from fxquant.quant.daq import (
    STEP_INDICES,
    WEIGHT_GRANULARITIES,
    bits_summary,
    check_bits,
    ste,
    step_gradient,
    steps_and_half,
)


def daq_weight_codes(w: torch.Tensor, bits: int | torch.Tensor, *,
                     granularity: str = "per-tensor", step_index: str = "head",
                     multiplier: torch.Tensor | None = None) -> AffineCodes:
    """The integer form of :func:`daq_weight_quantize`: ``Ŵ = (c − ½)·Δ``."""
    return daq_weight_quantize(w, bits, granularity=granularity, step_index=step_index,
                               multiplier=multiplier, codes=True)


def daq_weight_quantize(w: torch.Tensor, bits: int | torch.Tensor, *,
                        granularity: str = "per-tensor", step_index: str = "head",
                        multiplier: torch.Tensor | None = None,
                        codes: bool = False) -> torch.Tensor:
    """Symmetric mid-rise weight fake-quantization, without gradient.

    ``σ_w`` = std(W) over the tensor (official) or per output channel; ``Δ = s·σ_w``;
    ``Ŵ = clip((round(W/Δ + 0.5) − 0.5)·Δ, −T, T)``: 2^b levels, none at 0. ``bits`` is an
    int or a tensor broadcastable to ``w`` (per-input-channel bits for mixed precision).
    ``multiplier`` (a scalar, or one per output channel: learned by reconstruction) scales
    the step, ``Δ = s·σ_w·γ``.
    """
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"unknown weight granularity '{granularity}'; valid: "
                         f"{', '.join(WEIGHT_GRANULARITIES)}")
    with torch.no_grad():
        w = w.detach()
        shape = bits.shape if isinstance(bits, torch.Tensor) else ()
        s, h = steps_and_half(bits, step_index, w, shape)
        if granularity == "per-tensor":
            sigma = w.std() if w.numel() > 1 else torch.zeros((), dtype=w.dtype)
        else:
            flat = w.reshape(w.shape[0], -1)
            sigma = (flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0]))
            sigma = sigma.reshape((-1,) + (1,) * (w.ndim - 1))
        delta = s * sigma
        if multiplier is not None:
            delta = delta * multiplier.detach().to(w.dtype).reshape(
                multiplier.shape[:1] + (1,) * (w.ndim - 1) if multiplier.ndim else ())
        valid = torch.isfinite(delta) & (delta > 0)
        safe = torch.where(valid, delta, torch.ones_like(delta))
        r = torch.clamp(torch.round(w / safe + 0.5) - 0.5, -h, h)
        return (r * safe * valid) if not codes else AffineCodes(
            (r + 0.5).to(torch.int32), safe * valid, 0.5)


def weight_bits_map(channel_bits: torch.Tensor, out_channels: int, groups: int) -> torch.Tensor:
    """Per-input-channel bits (length C_in) -> the O×(C_in/g)×1×1 map the weight sees."""
    c_in = channel_bits.numel()
    per_group = c_in // groups
    o_g = out_channels // groups
    grid = channel_bits.reshape(groups, 1, per_group).expand(groups, o_g, per_group)
    return grid.reshape(out_channels, per_group, 1, 1)


class DAQWeightQuantizer(StepMultiplierMixin, Quantizer):
    """DAQ weight fake-quantizer (σ-scaled symmetric mid-rise), recomputed from the weight.

    ``bits`` is a persistent O×(C_in/g)×1×1 buffer so that mixed precision can give each
    input channel's weight slice the bits of that channel's activation. ``step_multiplier``
    (one per tensor or per output channel, as the granularity; 1 = official) scales the step;
    reconstruction learns it.
    """

    kind = "daq"

    def __init__(self, weight_shape: Sequence[int], bits: int | torch.Tensor, *,
                 granularity: str = "per-tensor", step_index: str = "head", groups: int = 1):
        super().__init__()
        if granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"unknown weight granularity '{granularity}'; valid: "
                             f"{', '.join(WEIGHT_GRANULARITIES)}")
        if step_index not in STEP_INDICES:
            raise ValueError(f"unknown step index '{step_index}'; valid: {', '.join(STEP_INDICES)}")
        self.weight_granularity = granularity
        self.step_index = step_index
        self.groups = groups
        self.out_channels, per_group = int(weight_shape[0]), int(weight_shape[1])
        self.register_buffer("bits", torch.empty(self.out_channels, per_group, 1, 1,
                                                 dtype=torch.int64))
        shape = (self.out_channels,) if granularity == "per-channel" else ()
        self.init_step_multiplier(shape)
        self.set_bits(bits)

    def set_bits(self, bits: int | torch.Tensor) -> None:
        """An int, or per-input-channel bits (length C_in = (C_in/g)·g)."""
        check_bits(bits)
        with torch.no_grad():
            if isinstance(bits, torch.Tensor) and bits.ndim == 1:
                bits = weight_bits_map(bits, self.out_channels, self.groups)
            self.bits.copy_(torch.as_tensor(bits, dtype=torch.int64).expand_as(self.bits))

    def _bits_arg(self) -> int | torch.Tensor:
        lo, hi = int(self.bits.min()), int(self.bits.max())
        return lo if lo == hi else self.bits

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        gamma = self.step_multiplier
        q = daq_weight_quantize(w, self._bits_arg(), granularity=self.weight_granularity,
                                step_index=self.step_index, multiplier=gamma)
        out = ste(w, q)
        if gamma.requires_grad and torch.is_grad_enabled():
            step = self.integer_codes(w).scale
            shape = (-1,) + (1,) * (w.ndim - 1) if gamma.ndim else ()
            out = out + step_gradient(w, q, step, torch.zeros(()), gamma, shape)
        return out

    def integer_codes(self, w: torch.Tensor) -> AffineCodes:
        """Mid-rise codes ``c = clip(round(W/Δ + ½), −h + ½, h + ½)``, ``Ŵ = (c − ½)·Δ``."""
        return daq_weight_codes(w, self._bits_arg(), granularity=self.weight_granularity,
                                step_index=self.step_index, multiplier=self.step_multiplier)

    def describe(self) -> dict:
        info = {"kind": self.kind, "bits": bits_summary(self.bits),
                "granularity": self.weight_granularity, "mode": "static"}
        return self.with_multiplier(info)

    def check(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as exc:
            raise ValueError(f"DAQ weight quantizer: {exc}") from None
        check_multiplier(self.step_multiplier, "DAQ weight quantizer")
