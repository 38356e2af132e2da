"""ODM's distribution offsets: a learnable channel-wise scale and/or shift on a quantizer's
input, and the statistics that decide where one is needed (docs/methods/odm.md).

The mismatch of a layer is how much its input's per-(image, channel) statistics move from
image to image, relative to the static range its quantizer covers::

    score = mean_c [ std_n(μ_{n,c}) + std_n(σ_{n,c}) ] / (s·(q_max − q_min))

with ``μ, σ`` the mean and standard deviation over H×W of image ``n``, channel ``c``. A static
range fits every image only when this is small (DAQ's motivation: SR features "are
significantly divergent for each channel or input image").
"""

from __future__ import annotations

import torch
from torch import nn

OFFSET_KINDS = ("scale", "shift", "both")


class ChannelOffset(nn.Module):
    """``x ↦ γ_c·x + β_c``: γ (init 1) is trained for kinds ``scale``/``both``, β (init 0) for
    ``shift``/``both``; the other stays a fixed buffer, so a ``scale`` offset stays foldable
    through a ReLU in front of it (``relu(γx) = γ·relu(x)`` for γ > 0)."""

    def __init__(self, channels: int, kind: str = "scale"):
        super().__init__()
        if kind not in OFFSET_KINDS:
            raise ValueError(f"offset kind '{kind}' unknown; valid: {', '.join(OFFSET_KINDS)}")
        self.channels, self.kind = channels, kind
        gamma, beta = torch.ones(channels), torch.zeros(channels)
        if kind in ("scale", "both"):
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        if kind in ("shift", "both"):
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.channels}, kind={self.kind}"


class MismatchStats:
    """Accumulates per-(image, channel) mean and std of a layer input across batches."""

    def __init__(self):
        self.means: list[torch.Tensor] = []
        self.stds: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        std, mean = torch.std_mean(x.flatten(2), dim=2, correction=0)
        self.means.append(mean)
        self.stds.append(std)

    def score(self, range_width: float) -> float:
        """The mismatch score of the module docstring (0 with fewer than two images)."""
        mean, std = torch.cat(self.means), torch.cat(self.stds)
        if mean.shape[0] < 2 or not range_width > 0:
            return 0.0
        spread = mean.std(dim=0) + std.std(dim=0)
        return float(spread.mean() / range_width)


def quantizer_range(quantizer: nn.Module) -> float | None:
    """Width of a static uniform quantizer's range, ``s·(q_max − q_min)`` (largest over
    channels); None for quantizers without a static scale (dynamic ones need no offsets)."""
    scale = getattr(quantizer, "scale", None)
    if not isinstance(scale, torch.Tensor) or not hasattr(quantizer, "qmax"):
        return None
    return float(scale.detach().max()) * (quantizer.qmax - quantizer.qmin)


def fold_into_conv(conv: nn.Conv2d, gamma: torch.Tensor, beta: torch.Tensor) -> None:
    """Make ``conv`` compute ``γ·conv(x) + β`` per output channel: ``W' = γ·W``,
    ``b' = γ·b + β``; a per-channel weight quantizer's scale scales with it (a uniform grid
    scaled by γ > 0 is the same grid of γ·W: fake-quant commutes with the scaling)."""
    with torch.no_grad():
        view = (-1,) + (1,) * (conv.weight.ndim - 1)
        conv.weight.mul_(gamma.view(view))
        bias = conv.bias if conv.bias is not None else None
        if bias is None:
            conv.bias = nn.Parameter(beta.clone())
        else:
            bias.mul_(gamma).add_(beta)
        quantizer = getattr(conv, "weight_quantizer", None)
        if quantizer is not None:
            quantizer.scale.mul_(gamma.view(quantizer.scale.shape))
