"""A strided transposed convolution run as a convolution followed by a pixel shuffle.

A ``ConvTranspose2d`` with stride ``s`` scatters every input pixel into an ``s×s`` block of
outputs; output phase ``r`` (its position modulo ``s``) only ever sees the kernel taps
``t ≡ r + p (mod s)``. So each phase is an ordinary correlation of the input with a small
kernel cut from the transposed one, and all ``s²`` phases together are one conv with
``C_out·s²`` output channels, whose pixel shuffle interleaves them back (the sub-pixel
convolution identity of ESPCN). For output index ``o = s·m + r`` and ``a, b = divmod(r + p, s)``::

    y[s·m + r] = Σ_j x[m + a − j] · w[s·j + b]

so phase ``r`` reads the input at offsets ``d = a − j``. The converted conv spans every offset
any phase reads (zero taps where a phase reads fewer) and the result is cropped to the
transposed conv's output size. Same products, summed in another order: equal to the
transposed conv up to float rounding (tests/lower/test_subpixel.py).

Why: oneDNN has no fast CPU kernel for a transposed conv with one output channel, and
FSRCNN's 9×9 stride-4 tail dominated its lowered time (docs/performance.md, per-op
breakdown); as a 3×3 conv it runs on the ordinary convolution kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.lower import ops  # noqa: F401 - registers fxquant::pixel_shuffle


def _phase_offsets(kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """The smallest and largest input offset ``d`` any output phase reads."""
    taps = math.ceil(kernel / stride)
    starts = [(r + padding) // stride for r in range(stride)]
    return min(starts) - (taps - 1), max(starts)


def convertible(deconv: nn.Module) -> bool:
    """True for a plain strided ConvTranspose2d this module reproduces."""
    return subpixel_refusal(deconv) is None and deconv.stride[0] > 1


def subpixel_refusal(deconv: nn.Module) -> str | None:
    """Why ``deconv`` has no conv + pixel shuffle form here, or None when it has one
    (a ``ConvTranspose2d``: groups 1, dilation 1, zero padding, equal strides; stride 1 is the
    plain conv of the flipped kernel)."""
    if type(deconv) is not nn.ConvTranspose2d:
        return f"{type(deconv).__name__} is not a ConvTranspose2d"
    for ok, what in ((deconv.groups == 1, f"groups={deconv.groups}"),
                     (deconv.dilation == (1, 1), f"dilation={deconv.dilation}"),
                     (deconv.padding_mode == "zeros", f"padding_mode='{deconv.padding_mode}'"),
                     (deconv.stride[0] == deconv.stride[1], f"stride={deconv.stride}")):
        if not ok:
            return f"{what} (only groups 1, dilation 1, zero padding and equal strides convert)"
    return None


def as_subpixel_conv(deconv: nn.ConvTranspose2d) -> tuple[nn.Conv2d, tuple[int, int, int, int]]:
    """``deconv`` as an ordinary ``Conv2d`` with ``C_out·s²`` outputs whose pixel shuffle by
    the stride ``s``, cropped by ``(top, bottom, left, right)`` output pixels, equals it for
    every input size (up to float rounding). The conv pads equally on both sides (the larger
    of the two pads the phases need, so that a quantized conv pads in code space as any
    other); the rows and columns this computes beyond the transposed conv's output are the
    crop. All four crops are constants: the output is ``s·n + c`` for an input of ``n``."""
    why = subpixel_refusal(deconv)
    if why:
        raise ValueError(f"{deconv} has no sub-pixel conv form: {why}")
    s = deconv.stride[0]
    spans = [_phase_offsets(k, s, p) for k, p in zip(deconv.kernel_size, deconv.padding)]
    low = tuple(lo for lo, _ in spans)
    size = tuple(hi - lo + 1 for lo, hi in spans)
    pads, crops = [], []
    for k, p, o, lo, n in zip(deconv.kernel_size, deconv.padding, deconv.output_padding,
                              low, size):
        c = k - s - 2 * p + o  # output = s·input + c
        extra = -(-c // s)  # conv rows beyond the input's: ceil(c / s)
        before, after = -lo, extra + n - 1 + lo
        pad = max(before, after, 0)
        pads.append(pad)
        crops.append((s * (pad - before), s * (pad - after) + s * extra - c))
    conv = nn.Conv2d(deconv.in_channels, deconv.out_channels * s * s, size, padding=tuple(pads),
                     bias=deconv.bias is not None)
    w = deconv.weight.detach()
    conv.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(_subpixel_kernel(deconv, low, size))
        if deconv.bias is not None:
            conv.bias.copy_(deconv.bias.detach().repeat_interleave(s * s))
    return conv, (crops[0][0], crops[0][1], crops[1][0], crops[1][1])


def _subpixel_kernel(deconv: nn.ConvTranspose2d, low: tuple[int, int],
                     size: tuple[int, int]) -> torch.Tensor:
    """The ``(C_out·s², C_in, *size)`` kernel whose output channel ``(c, ry, rx)`` is phase
    ``(ry, rx)`` of ``deconv``'s output channel ``c`` (pixel shuffle's channel order)."""
    s = deconv.stride[0]
    w = deconv.weight.detach()  # (C_in, C_out, kh, kw)
    kernel = torch.zeros(deconv.out_channels, s, s, deconv.in_channels, *size,
                         dtype=w.dtype, device=w.device)
    for ry in range(s):
        taps_y = _phase_taps(ry, s, deconv.kernel_size[0], deconv.padding[0], low[0])
        for rx in range(s):
            taps_x = _phase_taps(rx, s, deconv.kernel_size[1], deconv.padding[1], low[1])
            for uy, ty in taps_y:
                for ux, tx in taps_x:
                    kernel[:, ry, rx, :, uy, ux] = w[:, :, ty, tx].t()
    return kernel.flatten(0, 2)


class SubpixelConvTranspose2d(nn.Module):
    """``ConvTranspose2d`` (groups 1, dilation 1, square stride > 1) as the conv, pixel shuffle
    and crop of :func:`as_subpixel_conv`, in one float module for the lowered graph."""

    def __init__(self, conv: nn.Conv2d, stride: int, crops: tuple[int, int, int, int]):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels // stride ** 2
        self.stride, self.padding, self.crops = stride, tuple(conv.padding), tuple(crops)
        self.register_buffer("weight", conv.weight.detach().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    @classmethod
    def from_conv_transpose(cls, deconv: nn.ConvTranspose2d) -> "SubpixelConvTranspose2d":
        if not convertible(deconv):
            raise ValueError(f"{deconv} is not a plain strided ConvTranspose2d (groups 1, "
                             "dilation 1, zero padding, square stride > 1)")
        conv, crops = as_subpixel_conv(deconv)
        return cls(conv, deconv.stride[0], crops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ATen's pixel shuffle, kept out of Inductor's code generation (fxquant/lower/ops.py)
        y = torch.ops.fxquant.pixel_shuffle(
            F.conv2d(x, self.weight, self.bias, padding=self.padding), self.stride)
        top, bottom, left, right = self.crops
        return y[..., top:y.shape[-2] - bottom, left:y.shape[-1] - right]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"as conv {tuple(self.weight.shape[2:])} → pixel shuffle")


def _phase_taps(r: int, s: int, kernel: int, padding: int, low: int) -> list[tuple[int, int]]:
    """(position in the converted kernel, tap of the transposed kernel) read by phase ``r``."""
    a, b = divmod(r + padding, s)
    return [(a - j - low, s * j + b) for j in range(math.ceil(kernel / s)) if s * j + b < kernel]
