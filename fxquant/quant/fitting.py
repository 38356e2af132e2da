"""Fitting uniform quantizers to data: the static activation range an observer's statistics
give, and a weight quantizer fitted to a conv's weight. Passes call these; they do no graph
surgery themselves."""

from __future__ import annotations

import torch
from torch import nn

from fxquant.errors import CalibrationError
from fxquant.observers import HistogramObserver, MinMaxObserver, Observer
from fxquant.quant.ranges import channel_mse_ranges, mse_range, percentile_range
from fxquant.quant.uniform import UniformQuantizer, affine_qparams, symmetric_qparams
from fxquant.recipe import WeightConfig


def activation_range(observer: Observer, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static range an observer's statistics give (min/max, percentile or MSE search;
    per channel for min/max and MSE)."""
    if isinstance(observer, MinMaxObserver):
        return observer.min_val, observer.max_val
    if isinstance(observer, HistogramObserver):
        if observer.range_method == "percentile":
            lo, hi = percentile_range(observer.hist, observer.lo, observer.hi, observer.percentile)
        else:
            lo, hi = mse_range(observer.hist, observer.centres(), bits)
        return torch.tensor(lo), torch.tensor(hi)
    from fxquant.quant.subset import SampleObserver  # quant.subset imports observers

    if isinstance(observer, SampleObserver) and observer.mode == "static":  # per-channel MSE
        lo, hi = channel_mse_ranges(observer.values, observer.min_val, observer.max_val, bits)
        return lo.float(), hi.float()
    raise CalibrationError(f"observer {type(observer).__name__} at '{observer.node_name}' "
                           "gives no uniform range")


def activation_quantizer(observer: Observer, bits: int, channels: int | None) -> UniformQuantizer:
    """A static uniform activation quantizer, fitted when the observer saw data."""
    quantizer = UniformQuantizer(bits, channels=channels)
    if observer.has_data:
        lo, hi = activation_range(observer, bits)
        quantizer.set_qparams(*affine_qparams(lo, hi, bits))
    return quantizer


def weight_quantizer(conv: nn.Conv2d, config: WeightConfig, bits: int, *,
                     learnable: bool = False) -> UniformQuantizer:
    """Per-output-channel (or per-tensor) uniform weight quantizer fitted to ``conv.weight``
    (``learnable``: its scale is a Parameter, for reconstruction and QAT)."""
    weight = conv.weight.detach()
    per_channel = config.granularity == "per-channel"
    symmetric = config.observer == "symmetric"
    quantizer = UniformQuantizer(bits, symmetric=symmetric,
                                 channels=weight.shape[0] if per_channel else None,
                                 ch_axis=0, ndim=weight.ndim, learnable=learnable)
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    if symmetric:
        scale, zero_point = symmetric_qparams(flat.abs().max(dim=1).values, bits)
    else:
        scale, zero_point = affine_qparams(flat.min(dim=1).values, flat.max(dim=1).values,
                                           bits, include_zero=False)
    quantizer.set_qparams(scale, zero_point)
    return quantizer
