"""``equalize``: cross-layer equalization of activation ranges before quantization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.calibration import as_batches
from fxquant.errors import PassError
from fxquant.passes.folding import FloatOutputCheck, call_count, find_producer, install_module
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant.channel_norm import fold_input_scale, fold_output_scale
from fxquant.quant.equalization import equalization_scales, input_channel_absmax


def _channel_absmax(gm: fx.GraphModule, targets: list[str], batches: list[tuple]) -> dict:
    """Per-input-channel max-abs seen by each conv module in ``targets`` on ``batches``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for target in targets:
        def hook(module, args, target=target):
            amax = args[0].detach().abs().amax(dim=(0, 2, 3))
            seen[target] = amax if target not in seen else torch.maximum(seen[target], amax)
        handles.append(gm.get_submodule(target).register_forward_pre_hook(hook))
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                gm(*batch)
    finally:
        for handle in handles:
            handle.remove()
        gm.train(was_training)
    return seen


@register_pass
@dataclass(frozen=True)
class EqualizePass(Pass):
    """Move activation outliers into the next conv's weights (SmoothQuant-style equalization).

    Run on the float graph, before ``observe``. Before::

        conv_p ──► prelu ──► conv_c            activation channel c has range r_c

    After::

        conv_p' ──► prelu ──► conv_c'          W_p'[c] = W_p[c]/s_c, b_p'[c] = b_p[c]/s_c
                                               W_c'[:, c] = s_c·W_c[:, c]

    with ``s_c = r_c^α / w_c^(1−α)`` (``fxquant/quant/equalization.py``): ``r_c`` is the
    channel's max-abs on the first ``batches`` calibration batches, ``w_c`` the max-abs of
    conv_c's weights that read it. The float function is unchanged (positive homogeneity of
    ReLU/LeakyReLU/PReLU; zero padding commutes with a channel scale), so it lowers like any
    graph; a per-tensor activation quantizer at conv_c's input then sees balanced channels.

    A pair is taken when conv_c (an ``nn.Conv2d`` called once) reads a value that reaches it
    only through positively homogeneous single-user ops from a conv called once; other convs
    are listed in ``ctx.state["equalize"]`` with the reason. Folded convs are copies (the
    float model is untouched). With ``check``, the float output on a probe input must stay
    within ``tol`` (relative max-abs) of the output before the pass. Skipped when a compiled
    model is rebuilt for loading (the saved weights are the equalized ones).
    """

    name: ClassVar[str] = "equalize"
    alpha: float = 0.5
    batches: int = 4
    check: bool = True
    tol: float = 1e-4

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not 0.0 <= self.alpha <= 1.0:
            raise PassError(self.name, f"alpha={self.alpha} is not in [0, 1] (0: balance the "
                            "weights, 1: balance the activations, 0.5: both)")
        if self.batches < 1:
            raise PassError(self.name, f"batches={self.batches}: need at least 1 calibration batch")
        if not ctx.calibrate:
            return PassResult(gm, False, {"pairs": 0, "skipped": "rebuilding for load"})
        if ctx.calib is None:
            raise PassError(self.name, "needs calibration data (per-channel activation ranges); "
                            "pass calib= to compile")
        pairs, report = [], {}
        for node in gm.graph.nodes:
            if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.Conv2d:
                continue
            if call_count(gm, node.target) > 1:
                report[node.name] = f"refused: conv module '{node.target}' is called more than once"
                continue
            producer, offset, why = find_producer(gm, node)
            if producer is None:
                report[node.name] = f"refused: {why}"
            elif producer is node or offset or \
                    gm.get_submodule(producer.target).out_channels != gm.get_submodule(node.target).in_channels:
                report[node.name] = f"refused: {producer.name} feeds only part of its input"
            else:
                pairs.append((producer, node))
        batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)[: self.batches]
        ranges = _channel_absmax(gm, [c.target for _, c in pairs], batches)
        check = FloatOutputCheck(gm, ctx, self.check and bool(pairs))
        spread_before, spread_after = [], []
        for producer, consumer in pairs:
            conv_c = gm.get_submodule(consumer.target)
            r = ranges[consumer.target]
            s = equalization_scales(r, input_channel_absmax(conv_c), self.alpha)
            install_module(gm, producer.target, fold_output_scale(gm.get_submodule(producer.target), 1.0 / s))
            install_module(gm, consumer.target, fold_input_scale(conv_c, s))
            spread_before.append(_spread(r))
            spread_after.append(_spread(r / s))
            report[consumer.name] = (f"equalized with {producer.target}: channel range spread "
                                     f"{spread_before[-1]:.3g} -> {spread_after[-1]:.3g}")
        gm.recompile()
        info = {"pairs": len(pairs), "refused": len(report) - len(pairs), "alpha": self.alpha}
        if pairs:
            info["median_spread_before"] = float(torch.tensor(spread_before).median())
            info["median_spread_after"] = float(torch.tensor(spread_after).median())
        err = check.error()
        if err is not None:
            info["max_rel_error"] = err
            if err > self.tol:
                raise PassError(self.name, f"equalization changed the float output by {err:.3g} "
                                f"relative (tolerance {self.tol:g})")
        ctx.state["equalize"] = report
        return PassResult(gm, bool(pairs), info)


def _spread(absmax: torch.Tensor) -> float:
    """Largest over median channel range: how much a per-tensor range wastes on outliers."""
    alive = absmax[absmax > 0]
    return float(alive.max() / alive.median()) if alive.numel() else 1.0
