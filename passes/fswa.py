"""``fswa``: flex-scale weight adjustment of every quantized conv (I²NQ; fxquant/quant/fswa.py
has the math, docs/methods/i2nq.md the objective)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from tqdm import tqdm

from fxquant.calibration import as_batches
from fxquant.errors import PassError
from fxquant.passes.nonuniform_quant import FSWA_MODES, i2nq_options
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, UniformQuantizer
from fxquant.quant.fswa import adjust_weights, flex_scale, input_gram, output_error
from fxquant.recipe import RecipeError


class _Collected(Exception):
    """Raised by the input hook once the conv's input is summed: nothing after it matters."""


def _gram_of(gm: fx.GraphModule, conv: QuantConv2d, batches: list[tuple]) -> torch.Tensor:
    """Σ x xᵀ of the conv's inputs as the quantized graph delivers them (every conv before it
    already adjusted), running each batch only as far as the conv."""
    gram = None

    def hook(_module, args):
        nonlocal gram
        g = input_gram(conv, args[0])
        gram = g if gram is None else gram + g
        raise _Collected

    handle = conv.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    gm(*batch)
                except _Collected:
                    pass
    finally:
        handle.remove()
    return gram


@register_pass
@dataclass(frozen=True)
class FSWAPass(Pass):
    """Flex scale and weight adjustment of each :class:`QuantConv2d`, in graph order.

    The graph keeps its structure; each conv's weight quantizer gets per-output-channel
    clipping ratios minimising the output error on calibration inputs, and (``adjust``) the
    conv's weight becomes the error-compensated rounding on that grid::

        c1 (QuantConv2d, min/max grid)   ──►   c1 (QuantConv2d, flex grid, adjusted weight)

    Inputs are those the quantized graph delivers, the convs before already adjusted.
    ``mode`` (``adjust``/``scale``/``off``) overrides the recipe option. Skipped when a saved
    model is rebuilt for loading (its state dict holds the result).
    """

    name: ClassVar[str] = "fswa"
    mode: str | None = None

    def __post_init__(self):
        if self.mode is not None and self.mode not in FSWA_MODES:
            raise RecipeError(f"fswa.mode '{self.mode}' unknown; choose one of {', '.join(FSWA_MODES)}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options = i2nq_options(ctx)
        mode = self.mode or options.fswa
        convs = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), QuantConv2d)]
        if mode == "off" or not ctx.calibrate:
            return PassResult(gm, False, {"mode": mode, "layers": 0})
        if not convs:
            raise PassError(self.name, "no quantized convs to adjust; put 'fswa' after a "
                            "quantizing pass (e.g. nonuniform-quant)")
        batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)[:options.fswa_batches]
        before = after = 0.0
        was_training = gm.training
        gm.eval()
        for node in tqdm(convs, desc="fswa", disable=not ctx.progress, leave=False):
            conv = gm.get_submodule(node.target)
            quantizer = conv.weight_quantizer
            if not isinstance(quantizer, UniformQuantizer) or quantizer.channels is None:
                raise PassError(self.name, f"weights of '{node.target}' need a per-channel "
                                "uniform quantizer for a flex scale", node=node.name)
            gram = _gram_of(gm, conv, batches)
            if gram is None:
                raise PassError(self.name, f"no calibration input reached '{node.target}'",
                                node=node.name)
            weight = conv.weight.detach().clone()  # the float weight the error is measured to
            with torch.no_grad():
                reference = output_error(weight, quantizer.fake_quant(weight), gram).sum()
                flex_scale(weight, quantizer, gram, options.fswa_ratios, options.fswa_min_ratio)
                if mode == "adjust":
                    conv.weight.copy_(adjust_weights(weight, quantizer, gram, options.fswa_damp))
                error = output_error(weight, quantizer.fake_quant(conv.weight), gram).sum()
            before += float(reference)
            after += float(error)
        gm.train(was_training)
        return PassResult(gm, True, {"mode": mode, "layers": len(convs),
                                     "output_error_ratio": round(after / max(before, 1e-30), 4)})
