"""``fold-channel-norm``: fold static DFSQ channel scales into neighbouring convs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxquant.errors import PassError
from fxquant.passes.folding import (FloatOutputCheck, find_consumer, find_producer,
                                    install_module, refit_weight_quantizer)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant.channel_norm import fold_input_scale, fold_output_scale
from fxquant.quant.subset import SubsetQuantizer

@register_pass
@dataclass(frozen=True)
class FoldChannelNormPass(Pass):
    """Fold each static-mode :class:`SubsetQuantizer`'s per-channel scales into convs.

    Before::

        conv_p ──► relu ──► q{x·pre ─ round ─ ·post} ──► conv_c

    After (both folds possible)::

        conv_p' ──► relu ──► q{round} ──► conv_c'     W_p'[c] = pre_c·W_p[c], b_p'[c] = pre_c·b_p[c]
                                                       W_c'[:, c] = post_c·W_c[:, c]

    ``pre`` (1/s) goes into the producer conv's output channels when the value reaches the
    quantizer only through positively homogeneous ops (ReLU, LeakyReLU, PReLU) and channel
    slices of ``torch.split`` (the slice's channels only), and feeds nothing else; ``post`` (s) goes into the consumer conv's input channels unless the conv
    module is shared by several calls. Folded convs are copies (the float model is untouched)
    and their weight quantizers are re-fitted. A scale that cannot be folded stays a float
    per-channel multiply inside the quantizer; every refusal is reported with its reason in
    ``ctx.state["fold-channel-norm"]`` and counted in ``info``.

    With ``check`` (and a probe input: ``ctx.example_inputs`` or the first calibration
    sample), every fold is verified: the graph in float mode (no rounding) must give the
    same output as before the fold to ``tol`` relative (max-abs), else the pass fails.
    Dynamic-mode quantizers cannot be folded statically and are skipped.
    """

    name: ClassVar[str] = "fold-channel-norm"
    check: bool = True
    tol: float = 1e-5

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        qnodes = [n for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), SubsetQuantizer)
                  and gm.get_submodule(n.target).mode == "static"]
        dynamic = sum(1 for m in gm.modules() if isinstance(m, SubsetQuantizer)) - len(qnodes)
        report: dict[str, dict] = {}
        check = FloatOutputCheck(gm, ctx, self.check and bool(qnodes))
        worst = 0.0
        counts = {"pre_folded": 0, "post_folded": 0, "pre_refused": 0, "post_refused": 0}

        def verify(what: str, node: fx.Node) -> None:
            nonlocal worst
            err = check.error()
            if err is None:
                return
            worst = max(worst, err)
            if err > self.tol:
                raise PassError(self.name, f"folding {what} changed the float output by {err:.3g} "
                                f"relative (tolerance {self.tol:g})", node=node.name)

        for qnode in qnodes:
            quantizer: SubsetQuantizer = gm.get_submodule(qnode.target)
            entry = {}
            producer, offset, why = find_producer(gm, qnode)
            if producer is not None:
                conv = gm.get_submodule(producer.target)
                factor = torch.ones(conv.out_channels)
                factor[offset:offset + quantizer.channels] = quantizer.pre
                new = fold_output_scale(conv, factor)
                refit_weight_quantizer(new, ctx)
                install_module(gm, producer.target, new)
                with torch.no_grad():
                    if quantizer.guard:  # the guard now sees x·pre
                        quantizer.guard_lo.mul_(quantizer.pre)
                        quantizer.guard_hi.mul_(quantizer.pre)
                    quantizer.pre.fill_(1.0)
                where = f" {offset}..{offset + quantizer.channels - 1}" if offset or \
                    quantizer.channels != conv.out_channels else ""
                entry["pre"] = f"folded into {producer.target} (output channels{where})"
                counts["pre_folded"] += 1
                verify(f"pre into {producer.target}", qnode)
            else:
                entry["pre"] = f"refused: {why}"
                counts["pre_refused"] += 1
            consumer, why = find_consumer(gm, qnode)
            if consumer is not None:
                conv = gm.get_submodule(consumer.target)
                new = fold_input_scale(conv, quantizer.post)
                refit_weight_quantizer(new, ctx)
                install_module(gm, consumer.target, new)
                with torch.no_grad():
                    quantizer.post.fill_(1.0)
                entry["post"] = f"folded into {consumer.target} (input channels)"
                counts["post_folded"] += 1
                verify(f"post into {consumer.target}", qnode)
            else:
                entry["post"] = f"refused: {why}"
                counts["post_refused"] += 1
            report[qnode.name] = entry
        gm.recompile()
        ctx.state["fold-channel-norm"] = report
        info = {"static_quantizers": len(qnodes), "dynamic_skipped": dynamic, **counts}
        if check.probe is not None:
            info["max_rel_error"] = worst
        return PassResult(gm, counts["pre_folded"] + counts["post_folded"] > 0, info)
