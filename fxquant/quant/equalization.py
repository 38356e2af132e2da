"""Cross-layer equalization of activation ranges (SmoothQuant's migration rule on conv pairs).

``conv_p → act → conv_c`` with ``act`` positively homogeneous per channel (ReLU, LeakyReLU,
PReLU) computes the same function when conv_p's output channel c is divided by ``s_c`` and
conv_c's input channel c is multiplied by ``s_c``. The activation between them then has the
per-channel range ``r_c / s_c``. With

    s_c = r_c^α / w_c^(1−α)

(``r_c`` the channel's calibrated max-abs, ``w_c`` the max-abs of conv_c's weights that read
it) the activation ranges become ``r_c^(1−α)·w_c^(1−α)`` and the weight columns
``r_c^α·w_c^α``: α = 1 makes every activation channel's range equal (all the difficulty moves
into the weights, which are quantized per output channel), α = 0 equalizes the weight
columns. A per-tensor activation quantizer then stops wasting its levels on a few outlier
channels, and the lowered integer graph is unchanged in form.
"""

from __future__ import annotations

import torch
from torch import nn


def input_channel_absmax(conv: nn.Conv2d) -> torch.Tensor:
    """Max-abs of the weights that read each input channel (grouped convs included)."""
    w = conv.weight.detach().abs()
    groups = conv.groups
    out_per_group, in_per_group = conv.out_channels // groups, conv.in_channels // groups
    w = w.reshape(groups, out_per_group, in_per_group, -1)
    return w.amax(dim=(1, 3)).reshape(conv.in_channels)


def equalization_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float,
                        limit: float = 1e4) -> torch.Tensor:
    """``s_c = r_c^α / w_c^(1−α)``, 1 for a dead channel (zero activation or weights), clamped
    to ``[1/limit, limit]`` so a nearly dead channel cannot blow up the other layer."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    r = act_absmax.detach().double()
    w = weight_absmax.detach().double()
    if r.shape != w.shape:
        raise ValueError(f"{r.numel()} activation ranges for {w.numel()} weight columns")
    alive = (r > 0) & (w > 0) & torch.isfinite(r) & torch.isfinite(w)
    s = torch.ones_like(r)
    s[alive] = r[alive].pow(alpha) / w[alive].pow(1.0 - alpha)
    return s.clamp(1.0 / limit, limit).float()
