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
from fxquant.graph import nothing_selected
from fxquant.lockstep import run_in_lockstep
from fxquant.passes.nonuniform_quant import FSWA_MODES, i2nq_options
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, UniformQuantizer
from fxquant.quant.fswa import adjust_weights, flex_scale, input_gram, output_error
from fxquant.recipe import RecipeError


def _gram(conv: QuantConv2d, inputs: list[tuple]) -> torch.Tensor:
    """Σ x xᵀ of the conv's inputs, summed over the batches in order."""
    gram = None
    for args in inputs:
        g = input_gram(conv, args[0])
        gram = g if gram is None else gram + g
    return gram


@register_pass
@dataclass(frozen=True)
class FSWAPass(Pass):
    """Flex scale and weight adjustment of each :class:`QuantConv2d`, in graph order.

    The graph keeps its structure; each conv's weight quantizer gets per-output-channel
    clipping ratios minimising the output error on calibration inputs, and (``adjust``) the
    conv's weight becomes the error-compensated rounding on that grid::

        c1 (QuantConv2d, min/max grid)   ──►   c1 (QuantConv2d, flex grid, adjusted weight)

    Inputs are those the quantized graph delivers, the convs before already adjusted: the
    calibration batches run once, in lockstep (:func:`fxquant.lockstep.run_in_lockstep`), and
    each conv is fitted when every batch has reached it (before: every batch ran from the
    input up to each conv in turn, 2.5–4× the time on IMDN and PAN, the same weights). A conv
    module called at several sites is fitted again at each, to the inputs of its first call;
    the batches then resume at that call, the values before it kept.
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
        if mode == "off" or not ctx.calibrate or nothing_selected(ctx.state):
            return PassResult(gm, False, {"mode": mode, "layers": 0})
        if not convs:
            raise PassError(self.name, "no quantized convs to adjust; put 'fswa' after a "
                            "quantizing pass (e.g. nonuniform-quant)")
        batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)[:options.fswa_batches]
        targets = {node: gm.get_submodule(node.target) for node in convs}
        first_site: dict[str, fx.Node] = {}
        sites: dict[str, list[fx.Node]] = {}
        for node in convs:
            first_site.setdefault(node.target, node)
            sites.setdefault(node.target, []).append(node)
        grams: dict[str, torch.Tensor] = {}
        done: set[fx.Node] = set()
        errors = [0.0, 0.0]  # output error summed over convs, before and after
        bar = tqdm(total=len(convs), desc="fswa", disable=not ctx.progress, leave=False)

        def adjust(node: fx.Node, inputs: list[tuple]) -> fx.Node | None:
            """Fit ``node``'s conv unless done; when the conv already ran in this run (at its
            first site), that site, where the run must resume."""
            conv = targets.get(node)
            if conv is None:
                return None
            if not inputs:
                raise PassError(self.name, f"no calibration input reached '{node.target}'",
                                node=node.name)
            # the inputs every site of a module is fitted to, as the weights now deliver them
            if first_site[node.target] is node and not done.issuperset(sites[node.target]):
                grams[node.target] = _gram(conv, inputs)
            if node in done:
                return None
            quantizer = conv.weight_quantizer
            if not isinstance(quantizer, UniformQuantizer) or quantizer.channels is None:
                raise PassError(self.name, f"weights of '{node.target}' need a per-channel "
                                "uniform quantizer for a flex scale", node=node.name)
            gram = grams[node.target]
            weight = conv.weight.detach().clone()  # the float weight the error is measured to
            errors[0] += float(output_error(weight, quantizer.fake_quant(weight), gram).sum())
            flex_scale(weight, quantizer, gram, options.fswa_ratios, options.fswa_min_ratio)
            if mode == "adjust":
                conv.weight.copy_(adjust_weights(weight, quantizer, gram, options.fswa_damp))
            errors[1] += float(output_error(weight, quantizer.fake_quant(conv.weight), gram).sum())
            done.add(node)
            bar.update()
            return None if first_site[node.target] is node else first_site[node.target]

        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                # a module called at several sites (CARN-M's shared residual blocks) is fitted
                # again at each, to the inputs of its first call; what ran from that call on
                # is then stale, and the batches resume there
                shared = {first_site[t] for t, nodes in sites.items() if len(nodes) > 1}
                run_in_lockstep(gm, batches, adjust, until=convs[-1], keep_at=shared)
        finally:
            bar.close()
        gm.train(was_training)
        return PassResult(gm, True, {"mode": mode, "layers": len(convs),
                                     "output_error_ratio": round(errors[1] / max(errors[0], 1e-30), 4)})
