"""Uniform affine fake-quantization with straight-through gradients.

``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x̂ = (q - z)·s``. ``round`` is
``torch.round`` (half to even) in the forward pass and the identity in the backward pass,
so gradients reach both the input (masked outside the range by the clamp) and the scale,
which lets quantization-aware training learn ranges (LSQ-style).
"""

from __future__ import annotations

import torch

from fxquant.quant.base import AffineCodes, Quantizer, buffer_as_parameter

EPS = 1e-12


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, 2 ** bits - 1


def symmetric_range(bits: int) -> tuple[int, int]:
    """Restricted symmetric range ``±(2^(b-1) - 1)`` so that 0 is a level and the grid is odd."""
    limit = 2 ** (bits - 1) - 1
    return -limit, limit


def affine_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, *,
                   include_zero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point mapping ``[lo, hi]`` onto ``0..2^b - 1``.

    With ``include_zero`` the range is widened to contain 0 (activations, so that zero
    padding is exact). Without it the grid is still aligned to multiples of the step (the
    DFSQ weight quantizer): ``x̂ = s·clip(round(x/s), round(lo/s), round(lo/s) + 2^b - 1)``.
    """
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if include_zero:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
    qmin, qmax = unsigned_range(bits)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=EPS)
    zero_point = qmin - torch.round(lo / scale)
    return scale, zero_point


def symmetric_qparams(max_abs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    max_abs = torch.as_tensor(max_abs, dtype=torch.float32)
    _, qmax = symmetric_range(bits)
    scale = torch.clamp(max_abs / qmax, min=EPS)
    return scale, torch.zeros_like(scale)


class UniformQuantizer(Quantizer):
    """Static uniform fake-quantizer, per tensor or per channel along ``ch_axis``.

    ``scale`` and ``zero_point`` are buffers (state_dict round-trips); with ``learnable``
    the scale is a Parameter for QAT.

    ``folded`` (per-channel activations, set by the ``fold-input-scales`` pass): the step
    ``s_c`` has been moved into the consumer convs' weights, so the quantizer outputs the
    value in step units, ``x/s``: ``q − z`` (integer-valued) in fake-quant mode and ``x/s``
    when off or observing. The consumer then reads exactly the integer codes, which is what
    makes per-channel activations lowerable.
    """

    kind = "uniform"

    def __init__(self, bits: int, *, symmetric: bool = False, channels: int | None = None,
                 ch_axis: int = 1, ndim: int = 4, learnable: bool = False):
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.channels = channels
        self.ch_axis = ch_axis
        self.qmin, self.qmax = symmetric_range(bits) if symmetric else unsigned_range(bits)
        shape = [1] * ndim if channels is not None else []
        if channels is not None:
            shape[ch_axis] = channels
        scale = torch.ones(shape)
        if learnable:
            self.scale = torch.nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("zero_point", torch.zeros(shape))
        self.folded = False

    @property
    def granularity(self) -> str:
        return "per-channel" if self.channels is not None else "per-tensor"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.scale if self.folded else x  # folded consumers expect step units

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            q = torch.clamp(round_ste(x / self.scale) + self.zero_point, self.qmin, self.qmax)
            return q - self.zero_point
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def fold(self) -> None:
        """Mark the per-channel step as moved into the consumers (see the class docstring)."""
        if self.channels is None or self.ch_axis != 1:
            raise ValueError("only a per-channel activation quantizer (channel axis 1) folds "
                             "its step into the next conv")
        if isinstance(self.scale, torch.nn.Parameter):
            if self.scale.requires_grad:
                raise ValueError("a step still being trained cannot be folded into fixed weights")
            # learned and frozen (after reconstruct): a buffer again, so that no later
            # training moves a step the consumers' weights already hold
            scale = self.scale.detach().clone()
            del self._parameters["scale"]
            self.register_buffer("scale", scale)
        self.folded = True

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The scale as a Parameter (LSQ-style: the step learns through the straight-through
        rounding; the zero point stays fixed). The state_dict key stays ``scale``. A folded
        quantizer offers nothing: its step is baked into the consumers' weights."""
        if self.folded:
            return []
        return [buffer_as_parameter(self, "scale")]

    def constrain(self) -> None:
        if isinstance(self.scale, torch.nn.Parameter):
            with torch.no_grad():
                self.scale.clamp_(min=1e-8)

    def integer_codes(self, x: torch.Tensor) -> AffineCodes:
        """``q = clamp(round(x/s) + z, qmin, qmax)`` as int32, with ``s`` and ``z``."""
        with torch.no_grad():
            q = torch.clamp(torch.round(x.detach() / self.scale) + self.zero_point,
                            self.qmin, self.qmax).to(torch.int32)
        scale = torch.ones_like(self.scale) if self.folded else self.scale.detach()
        return AffineCodes(q, scale, self.zero_point.detach(), None, self.qmin, self.qmax)

    def describe(self) -> dict:
        info = {"kind": self.kind, "bits": self.bits, "granularity": self.granularity,
                "mode": "static", "symmetric": self.symmetric}
        return {**info, "folded": True} if self.folded else info

    def check(self) -> None:
        if not torch.isfinite(self.scale).all() or (self.scale <= 0).any():
            raise ValueError("uniform quantizer has a non-finite or non-positive scale")
        if not torch.isfinite(self.zero_point).all():
            raise ValueError("uniform quantizer has a non-finite zero point")
