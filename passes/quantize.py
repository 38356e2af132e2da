"""``quantize``: replace observers by uniform fake-quantizers and quantize conv weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.errors import CalibrationError
from fxquant.graph import replace_module_node
from fxquant.observers import HistogramObserver, MinMaxObserver, Observer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, UniformQuantizer, swap_in_quant_conv
from fxquant.quant.ranges import mse_range, percentile_range
from fxquant.quant.uniform import affine_qparams, symmetric_qparams
from fxquant.recipe import MAX_BITS, MIN_BITS, RecipeError, WeightConfig


def activation_range(observer: Observer, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static range an observer's statistics give (min/max, percentile or MSE search)."""
    if isinstance(observer, MinMaxObserver):
        return observer.min_val, observer.max_val
    if isinstance(observer, HistogramObserver):
        if observer.range_method == "percentile":
            lo, hi = percentile_range(observer.hist, observer.lo, observer.hi, observer.percentile)
        else:
            lo, hi = mse_range(observer.hist, observer.centres(), bits)
        return torch.tensor(lo), torch.tensor(hi)
    raise CalibrationError(f"observer {type(observer).__name__} at '{observer.node_name}' "
                           "gives no uniform range")


def weight_quantizer(conv: nn.Conv2d, config: WeightConfig, bits: int) -> UniformQuantizer:
    """Per-output-channel (or per-tensor) uniform weight quantizer fitted to ``conv.weight``."""
    weight = conv.weight.detach()
    per_channel = config.granularity == "per-channel"
    symmetric = config.observer == "symmetric"
    quantizer = UniformQuantizer(bits, symmetric=symmetric,
                                 channels=weight.shape[0] if per_channel else None,
                                 ch_axis=0, ndim=weight.ndim)
    flat = weight.reshape(weight.shape[0], -1) if per_channel else weight.reshape(1, -1)
    if symmetric:
        scale, zero_point = symmetric_qparams(flat.abs().max(dim=1).values, bits)
    else:
        scale, zero_point = affine_qparams(flat.min(dim=1).values, flat.max(dim=1).values,
                                           bits, include_zero=False)
    quantizer.set_qparams(scale, zero_point)
    return quantizer


@register_pass
@dataclass(frozen=True)
class QuantizePass(Pass):
    """Uniform fake-quantization of every observed layer.

    Before::                                   After::

        x ──► c1_input_observer ──► c1 (Conv2d)     x ──► c1_input_quantizer ──► c1 (QuantConv2d)

    The activation quantizer takes its static range from the observer (min/max, percentile
    or MSE search, per the recipe); the conv becomes a :class:`QuantConv2d` whose weight is
    fake-quantized per output channel. ``w``/``a`` override the recipe's bit-widths.
    """

    name: ClassVar[str] = "quantize"
    w: int | None = None
    a: int | None = None

    def __post_init__(self):
        for key in ("w", "a"):
            bits = getattr(self, key)
            if bits is not None and not MIN_BITS <= bits <= MAX_BITS:
                raise RecipeError(f"quantize.{key} = {bits} is impossible; use {MIN_BITS}..{MAX_BITS}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        a_bits = self.a or recipe.activations.bits
        w_bits = self.w or recipe.weights.bits
        activations = weights = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            observer = gm.get_submodule(node.target)
            if not isinstance(observer, Observer):
                continue
            (consumer,) = node.users
            conv = gm.get_submodule(consumer.target)
            channels = conv.in_channels if recipe.activations.granularity == "per-channel" else None
            quantizer = UniformQuantizer(a_bits, channels=channels)
            if observer.has_data:
                lo, hi = activation_range(observer, a_bits)
                quantizer.set_qparams(*affine_qparams(lo, hi, a_bits))
            elif ctx.calibrate:
                raise CalibrationError(f"observer '{node.target}' saw no calibration data: "
                                       "is the layer reached by the forward pass?")
            replace_module_node(gm, node, quantizer, f"{consumer.name}_input_quantizer")
            activations += 1
            if isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantConv2d):
                swap_in_quant_conv(gm, consumer.target, weight_quantizer(conv, recipe.weights, w_bits))
                weights += 1
        gm.recompile()
        return PassResult(gm, bool(activations), {"activation_quantizers": activations,
                                                  "weight_quantizers": weights})
