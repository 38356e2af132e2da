"""Flex-scale weight adjustment (FSWA, I²NQ's weight step as fxquant reads it:
docs/methods/i2nq.md).

A conv's output channel o computes ``y_o = w_oᵀ x`` over its receptive field ``x`` (``K`` =
in_channels/groups · k_h · k_w values). With the conv's calibration inputs summarised by their
Gram matrix ``H = Σ x xᵀ`` (per group), the output error of a quantized weight row is::

    e_o(ŵ) = (w_o − ŵ_o)ᵀ H (w_o − ŵ_o)

* **flex scale**: every output channel picks its own clipping ratio ``r_o`` of the min/max
  range (the grid's step scales with it) minimising ``e_o`` — not the weights' own squared
  error, which lets rare large weights be clipped although the output needs them;
* **weight adjust**: with the scales fixed, the rounding is chosen column by column and the
  error of each rounded weight is pushed onto the weights not yet rounded, along ``H⁻¹``
  (the optimal-brain-quantization update of GPTQ, Frantar et al. 2023), so what one weight
  loses the others of its row carry.

Both only read ``H``; the graph and the data never enter this module (the ``fswa`` pass
collects ``H``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.quant.layers import padded_like_conv
from fxquant.quant.uniform import UniformQuantizer, affine_qparams, symmetric_qparams


def input_gram(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``Σ x xᵀ`` of the conv's receptive fields in ``x``: ``groups × K × K`` (float64)."""
    # padded as the conv pads ('same', reflect, ...): F.unfold pads zeros, symmetrically
    cols = F.unfold(padded_like_conv(conv, x.detach().float()), conv.kernel_size,
                    conv.dilation, 0, conv.stride)  # N × (C·kh·kw) × positions, like the weight
    n, _, positions = cols.shape
    # groups × K × (N·positions); float32 products (sgemm), summed per batch into float64
    cols = cols.view(n, conv.groups, -1, positions).permute(1, 2, 0, 3).reshape(conv.groups, -1, n * positions)
    return torch.bmm(cols, cols.transpose(1, 2)).double()


def _rows(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight as ``groups × (out/groups) × K`` rows (float64)."""
    return weight.detach().double().reshape(groups, weight.shape[0] // groups, -1)


def output_error(weight: torch.Tensor, quantized: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``e_o`` for every output channel (see the module docstring)."""
    groups = gram.shape[0]
    diff = _rows(weight, groups) - _rows(quantized, groups)
    return torch.einsum("gok,gkm,gom->go", diff, gram, diff).reshape(-1)


def _set_ratio(quantizer: UniformQuantizer, weight: torch.Tensor, ratio: torch.Tensor) -> None:
    """The quantizer's per-channel grid for the range ``ratio_o · (min_o, max_o)``."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    if quantizer.symmetric:
        scale, zero_point = symmetric_qparams(flat.abs().amax(1) * ratio, quantizer.bits)
    else:
        scale, zero_point = affine_qparams(flat.amin(1) * ratio, flat.amax(1) * ratio,
                                           quantizer.bits, include_zero=False)
    quantizer.set_qparams(scale, zero_point)


def flex_scale(weight: torch.Tensor, quantizer: UniformQuantizer, gram: torch.Tensor,
               ratios: int = 40, min_ratio: float = 0.3) -> torch.Tensor:
    """Set each output channel's clipping ratio (from 1 down to ``min_ratio``) to the one with
    the least output error; returns the chosen ratios. Needs a per-channel quantizer."""
    if quantizer.channels is None:
        raise ValueError("flex scale needs a per-output-channel weight quantizer")
    best_ratio = torch.ones(weight.shape[0])
    best_error = None
    for r in torch.linspace(1.0, min_ratio, ratios).tolist():
        ratio = torch.full((weight.shape[0],), r)
        _set_ratio(quantizer, weight, ratio)
        with torch.no_grad():
            error = output_error(weight, quantizer.fake_quant(weight), gram)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_ratio = torch.where(better, ratio, best_ratio)
        best_error = torch.where(better, error, best_error)
    _set_ratio(quantizer, weight, best_ratio)
    return best_ratio


def adjust_weights(weight: torch.Tensor, quantizer: UniformQuantizer, gram: torch.Tensor,
                   damp: float = 0.01) -> torch.Tensor:
    """Quantized weights (on the quantizer's grid) chosen column by column with error feedback
    along ``H⁻¹`` (GPTQ). ``damp``·mean(diag H) is added to the diagonal; inputs that never
    vary (zero diagonal) get their weights zeroed, as they contribute nothing."""
    groups = gram.shape[0]
    rows = _rows(weight, groups).clone()
    per_group = rows.shape[1]
    scale = quantizer.scale.detach().double().reshape(-1).expand(weight.shape[0])
    zero = quantizer.zero_point.detach().double().reshape(-1).expand(weight.shape[0])
    out = torch.empty_like(rows)
    for g in range(groups):
        h = gram[g].clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        w = rows[g]
        w[:, dead] = 0.0
        h += torch.eye(h.shape[0], dtype=h.dtype) * damp * torch.diagonal(h).mean()
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        s = scale[g * per_group:(g + 1) * per_group]
        z = zero[g * per_group:(g + 1) * per_group]
        for i in range(w.shape[1]):
            q = (torch.clamp(torch.round(w[:, i] / s) + z, quantizer.qmin, quantizer.qmax) - z) * s
            err = (w[:, i] - q) / u[i, i]
            w[:, i:] -= err.unsqueeze(1) * u[i, i:].unsqueeze(0)
            out[g, :, i] = q
    return out.reshape(weight.shape).to(weight.dtype)
