"""``wcc``: give every quantized conv ODM v2's weight-clipping-corrected weight grid
(fxquant/quant/wcc.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.errors import PassError, RecipeError
from fxquant.graph import nothing_selected
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d
from fxquant.quant.wcc import ClippedWeightQuantizer
from fxquant.recipe import check_pass_options


@register_pass
@dataclass(frozen=True)
class WCCPass(Pass):
    """Swap each :class:`QuantConv2d`'s weight quantizer for a :class:`ClippedWeightQuantizer`
    (symmetric, per tensor, range = the ``percentile``-th percentile of ``|W|`` times a learnable
    ``γ`` that starts at 1), keeping its bit-width (``w`` overrides it)::

        c1 (QuantConv2d, per-channel min/max grid)  ──►  c1 (QuantConv2d, wcc grid: f(|W|)·γ)

    The graph is unchanged; QAT (``fxquant train``) then learns ``γ`` with the weights.
    """

    name: ClassVar[str] = "wcc"
    percentile: float = 99.0
    w: int | None = None

    def __post_init__(self):
        check_pass_options(self.name, {"w": self.w})
        if not 0 < self.percentile <= 100:
            raise RecipeError(f"wcc.percentile = {self.percentile} must lie in (0, 100]")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        swapped = 0
        for module in gm.modules():
            if isinstance(module, QuantConv2d):
                bits = self.w or getattr(module.weight_quantizer, "bits", ctx.recipe.weights.bits)
                module.weight_quantizer = ClippedWeightQuantizer(bits, self.percentile)
                swapped += 1
        if not swapped and nothing_selected(ctx.state):  # compile names the layer rules
            return PassResult(gm, False, {"convs": 0})
        if not swapped:
            raise PassError(self.name, "no quantized conv to give a wcc grid: put 'wcc' after "
                                       "'quantize'")
        return PassResult(gm, True, {"convs": swapped})
