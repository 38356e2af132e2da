"""The check in front of a lowered graph: inputs it cannot take get a clear error, not a
oneDNN stack trace."""

from __future__ import annotations

import math

import torch
from torch import nn

from fxquant.lower.conv import LoweringError


class InputGuard(nn.Module):
    """Passes a N×C×H×W floating-point image through, or raises :class:`LoweringError`."""

    def __init__(self, channels: int | None, cpu_only: bool = True):
        super().__init__()
        self.channels = channels
        self.cpu_only = cpu_only  # reference and cpu targets; gpu runs where its buffers are
        # moves with .to(): the device the lowered model lives on (not saved)
        self.register_buffer("device_probe", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise LoweringError(f"lowered model takes a N×C×H×W image batch, got {shape}")
        if not x.is_floating_point():
            raise LoweringError(f"lowered model takes a floating-point image, got {x.dtype}")
        if x.dtype != torch.float32:  # the float ops around the integer convs are float32
            raise LoweringError(f"lowered model takes float32 images, got {x.dtype}; convert "
                                "the input with x.float()")
        n, c, h, w = x.shape
        if n < 1 or h < 1 or w < 1:
            raise LoweringError(f"lowered model got an empty batch {tuple(x.shape)}; give at "
                                "least one image of at least 1×1 pixels")
        if self.channels is not None and c != self.channels:
            raise LoweringError(f"lowered model takes {self.channels}-channel images, got {c} "
                                f"channels (shape {tuple(x.shape)})")
        if self.cpu_only and x.device.type != "cpu":
            raise LoweringError(f"the reference and cpu targets run on the CPU; got a tensor "
                                f"on {x.device}")
        if x.device != self.device_probe.device:
            raise LoweringError(f"the lowered model is on {self.device_probe.device} but the "
                                f"input is on {x.device}; move one to the other "
                                "(model.to(device) or x.to(device))")
        # torch.export and CUDA-graph capture cannot take a data-dependent raise (a graph's
        # replays skip the check)
        if not torch.compiler.is_exporting() and not _capturing(x):
            _check_finite(x)
        return x

    def extra_repr(self) -> str:
        return f"channels={self.channels}" + (", cpu only" if self.cpu_only else "")


def _capturing(x: torch.Tensor) -> bool:
    """True while ``x``'s CUDA stream is being captured into a CUDA graph."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@torch.compiler.disable  # a data-dependent raise: run eagerly in front of a compiled graph
def _check_finite(x: torch.Tensor) -> None:
    """NaN or inf has no integer code: the cast gives an arbitrary one, so refuse it here."""
    # any NaN/inf makes the sum non-finite: one reduction (~20 us at 1×3×128², against ~150
    # for isfinite().all()); only then are the values counted (a finite sum that overflowed
    # counts none and passes)
    if math.isfinite(float(x.sum())):
        return
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise LoweringError(f"lowered model got an image with {bad} NaN/inf values "
                            f"(shape {tuple(x.shape)}); integer codes exist only for finite "
                            "values, so give finite images")
