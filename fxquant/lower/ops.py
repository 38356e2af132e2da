"""Ops the ``cpu`` target keeps out of Inductor's code generation.

``pixel_shuffle``: Inductor's generated kernel for a channels-last pixel shuffle (the layout
the oneDNN convs produce) is several times slower than ATen's own channels-last kernel
(``python tools/bench_pixel_shuffle.py``; docs/lowering.md has its numbers), and SR
upsamplers shuffle the largest tensors of the network. As a custom op it stays an opaque call
to the ATen kernel inside a compiled graph.

``upsample``: the same for bilinear/bicubic ``F.interpolate`` by a scale factor (the global
skip of PAN-style models), whose Inductor kernel was slower than ATen's
(``python tools/bench_upsample.py``; docs/lowering.md has its numbers).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("fxquant::pixel_shuffle", mutates_args=())
def pixel_shuffle(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    out = torch.pixel_shuffle(x, upscale_factor)
    # a custom op's output must not alias its input
    return out.clone() if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else out


@pixel_shuffle.register_fake
def _(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    n, c, h, w = x.shape
    r = upscale_factor
    return _empty_like_layout(x, (n, c // (r * r), h * r, w * r))


@torch.library.custom_op("fxquant::pixel_shuffle_phase_major", mutates_args=())
def pixel_shuffle_phase_major(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """A pixel shuffle of channels stored phase-major: channel ``(i·r + j)·C + c`` holds what
    ``pixel_shuffle`` takes from channel ``c·r² + i·r + j`` (output channel ``c``, sub-pixel
    row ``i``, column ``j``). For an NHWC input the copy then moves runs of ``r·C`` contiguous
    values instead of gathering single values across the ``r²`` channel stride (the ``lower``
    pass permutes the output channels of the conv in front to this order). Channels-last
    output, as ATen's ``pixel_shuffle`` gives for a channels-last input."""
    n, k, h, w = x.shape
    r = upscale_factor
    c = k // (r * r)
    y = x.permute(0, 2, 3, 1).reshape(n, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5)
    out = y.reshape(n, h * r, w * r, c).permute(0, 3, 1, 2)
    # a custom op's output must not alias its input (a reshape is a view when r or w is 1)
    return out.clone(memory_format=torch.channels_last) \
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else out


def phase_major_order(channels: int, upscale_factor: int) -> torch.Tensor:
    """``order[(i·r + j)·C + c] = c·r² + i·r + j``: the channel a phase-major tensor holds at
    each position, for :func:`pixel_shuffle_phase_major` with ``C = channels``."""
    r2 = upscale_factor * upscale_factor
    return torch.arange(channels * r2).view(channels, r2).t().reshape(-1)


@pixel_shuffle_phase_major.register_fake
def _(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    n, c, h, w = x.shape
    r = upscale_factor
    return x.new_empty((n, c // (r * r), h * r, w * r)).contiguous(
        memory_format=torch.channels_last)


@torch.library.custom_op("fxquant::upsample", mutates_args=())
def upsample(x: torch.Tensor, scale_factor: float, mode: str, align_corners: bool) -> torch.Tensor:
    """``F.interpolate`` by a scale factor in a smooth mode (bilinear, bicubic): Inductor's
    generated kernel for it was slower than ATen's at the size of an SR model's global skip
    (``python tools/bench_upsample.py``), so the ``cpu`` lowering calls ATen's."""
    return torch.nn.functional.interpolate(x, scale_factor=scale_factor, mode=mode,
                                           align_corners=align_corners)


@upsample.register_fake
def _(x: torch.Tensor, scale_factor: float, mode: str, align_corners: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    return _empty_like_layout(x, (n, c, int(h * scale_factor), int(w * scale_factor)))


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty ``shape`` tensor in ``x``'s layout (channels-last stays channels-last), as the
    ATen kernels behind these ops return it."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return x.new_empty(shape).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
