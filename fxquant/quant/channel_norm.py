"""Channel normalization of conv inputs for DFSQ, and folding static channel scales into convs.

Dynamic (official ``SetQConv2d``, METHODS.md §3.3): statistics per (image, channel), over
H×W, recomputed on every call and detached::

    post-ReLU input:  m = max|x|,        x̃ = x / (m + eps)               ∈ [0, 1]
    other inputs:     μ = mean x,  m = max|x − μ|,  x̃ = (x − μ) / (m + eps)   ∈ [−1, 1]
    de-normalize:     y = x̂·(m + eps) [+ μ]

Static (fxquant's foldable variant): one scale ``s_c`` per channel from calibration
(``s_c = max |x_c|`` over every calibration value), ``x̃ = x / s_c`` and ``y = x̂·s_c``. No
mean shift, because a constant shift does not commute with a conv's zero padding. The two
multiplies can be folded into neighbouring convs (:func:`fold_output_scale`,
:func:`fold_input_scale`); the graph decisions live in the ``fold-channel-norm`` pass.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

EPS = 1e-8


def dynamic_stats(x: torch.Tensor, post_relu: bool, eps: float = EPS
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per (n, c) scale ``m + eps`` and mean ``μ`` (None for post-ReLU inputs), detached."""
    scale, mean, _, _ = dynamic_stats_minmax(x, post_relu, eps)
    return scale, mean


def dynamic_stats_minmax(x: torch.Tensor, post_relu: bool, eps: float = EPS):
    """``(m + eps, μ, min, max)`` per (n, c), shaped ``N × C × 1 × …``.

    ``max|x − μ|`` is taken as ``max(max x − μ, μ − min x)``: float subtraction is monotone,
    so this is bit-identical to reducing ``|x − μ|`` and needs no full-size temporary.
    """
    with torch.no_grad():
        n, c = x.shape[0], x.shape[1]
        shape = (n, c) + (1,) * (x.ndim - 2)
        pieces = _position_chunks(x)
        if pieces is not None:  # N × C × chunks × L: per chunk, then across chunks
            lo, hi = torch.aminmax(pieces, dim=3)
            lo, hi = lo.amin(2), hi.amax(2)
        else:  # eager: amin and amax, not aminmax, whose CPU kernel along a dim runs about
            # 20× slower than the two (8×64×48²: 1.3 ms against 0.07; the same values)
            flat = x.reshape(n, c, -1)
            lo, hi = flat.amin(2), flat.amax(2)
        lo, hi = lo.view(shape), hi.view(shape)
        if post_relu:
            return torch.maximum(-lo, hi) + eps, None, lo, hi
        mean = _mean(x, pieces)
        return torch.maximum(hi - mean, mean - lo) + eps, mean, lo, hi


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Per (n, c) mean over the positions, ``N × C × 1 × …``; under Inductor over the same
    chunks as :func:`dynamic_stats_minmax`, so that it takes the same pass as the minimum and
    maximum (the lowered DFSQ codes read a post-ReLU input's mean beside its maximum)."""
    return _mean(x, _position_chunks(x))


def _mean(x: torch.Tensor, pieces: torch.Tensor | None) -> torch.Tensor:
    """:func:`channel_mean` over the chunks :func:`_position_chunks` gave (None: at once)."""
    if pieces is None:
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    shape = tuple(x.shape[:2]) + (1,) * (x.ndim - 2)
    return (pieces.sum(3).sum(2) / (pieces.shape[2] * pieces.shape[3])).view(shape)


def _position_chunks(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as ``N × C × chunks × L`` when compiled by Inductor and the positions split
    (:func:`reduction_chunks`); None otherwise (eager, torch.export, or a graph compiled for
    any input size: one reduction). An exported program, or a dynamic-shape graph, would keep
    the divisibility as a guard: Dynamo recompiled a dynamic-shape DFSQ model for each new
    pattern of divisors until its limit of 8, then ran it eagerly."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    chunks = reduction_chunks(flat.shape[2])
    return flat.unflatten(2, (chunks, -1)) if chunks > 1 else None


# Inductor parallelizes a per-(n, c) reduction over its outer n·C/16 vector rows only: one
# image of 48 channels is 3 rows for 2 threads, and each row strides through the whole map.
# Split into chunks of the spatial positions it has n·C/16·chunks independent rows (its gain
# on a whole model is not measured apart, docs/performance.md "The concat's codes piece by
# piece"). Eager keeps one reduction (ATen's own kernels), so the fake-quantizer's statistics
# are unchanged; minimum and maximum are exact either way, the mean moves by float rounding.
MAX_REDUCTION_CHUNKS = 32


def reduction_chunks(positions: int) -> int:
    """The largest divisor of ``positions`` up to :data:`MAX_REDUCTION_CHUNKS`, leaving at
    least 64 positions per chunk (1 for small maps, and for a symbolic count: a divisor
    of a dynamic-shape graph's positions would be a guard, one recompile per pattern)."""
    for chunks in range(MAX_REDUCTION_CHUNKS, 1, -1):
        # a plain int is known; a SymInt is not, and Dynamo adds no guard for asking
        if statically_known_true(positions % chunks == 0) and positions // chunks >= 64:
            return chunks
    return 1


def normalize(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    return (x - mean) / scale if mean is not None else x / scale


def denormalize(x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    return x * scale + mean if mean is not None else x * scale


def static_scale(max_abs: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Static per-channel scale from the calibration max-abs (``eps`` keeps dead channels finite)."""
    return max_abs.float() + eps


# ----------------------------------------------------------------------------- folding
def _per_channel(factor: torch.Tensor, n: int, what: str) -> torch.Tensor:
    factor = factor.detach().reshape(-1)
    if factor.numel() != n:
        raise ValueError(f"{what}: {factor.numel()} factors for {n} channels")
    if not torch.isfinite(factor).all() or (factor <= 0).any():
        raise ValueError(f"{what}: factors must be finite and > 0 (positive homogeneity)")
    return factor


def fold_output_scale(conv: nn.Conv2d, factor: torch.Tensor) -> nn.Conv2d:
    """A copy of ``conv`` whose output channel o is multiplied by ``factor[o]``
    (weights and bias). The original module is untouched (it may be the user's)."""
    factor = _per_channel(factor, conv.out_channels, "fold_output_scale")
    new = copy.deepcopy(conv)
    with torch.no_grad():
        shape = [-1] + [1] * (conv.weight.ndim - 1)
        new.weight = nn.Parameter(conv.weight.detach() * factor.to(conv.weight.dtype).view(shape),
                                  requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            new.bias = nn.Parameter(conv.bias.detach() * factor.to(conv.bias.dtype),
                                    requires_grad=conv.bias.requires_grad)
    return new


def fold_input_scale(conv: nn.Conv2d, factor: torch.Tensor) -> nn.Conv2d:
    """A copy of ``conv`` computing ``conv(x · factor[c])`` from ``x``: ``W[:, c] *= factor[c]``
    (grouped convs: input channel c is column ``c mod in_per_group`` of its group's rows).
    Exact with any padding mode, since padding commutes with a per-channel scale."""
    factor = _per_channel(factor, conv.in_channels, "fold_input_scale")
    groups = conv.groups
    in_per_group = conv.in_channels // groups
    out_per_group = conv.out_channels // groups
    # factor for weight element (o, j): channel g(o)*in_per_group + j
    grid = factor.view(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    grid = grid.reshape(conv.out_channels, in_per_group)
    new = copy.deepcopy(conv)
    with torch.no_grad():
        shape = list(grid.shape) + [1] * (conv.weight.ndim - 2)
        new.weight = nn.Parameter(conv.weight.detach() * grid.to(conv.weight.dtype).view(shape),
                                  requires_grad=conv.weight.requires_grad)
    return new
