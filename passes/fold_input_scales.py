"""``fold-input-scales``: move per-channel activation steps into the convs that read them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.errors import PassError
from fxquant.passes.folding import (FloatOutputCheck, install_module, reader_problem,
                                    refit_weight_quantizer)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, UniformQuantizer
from fxquant.quant.channel_norm import fold_input_scale


def _readers(gm: fx.GraphModule, node: fx.Node) -> tuple[list[fx.Node], str]:
    """The QuantConv2d nodes reading ``node`` as their only input, or why it cannot fold."""
    users = list(node.users)
    for user in users:
        why = reader_problem(gm, node, user, (QuantConv2d,))
        if why:
            return [], why
    return users, ""


@register_pass
@dataclass(frozen=True)
class FoldInputScalesPass(Pass):
    """Fold each per-channel activation quantizer's step into the convs it feeds.

    Before::

        x ──► q{s_c, z_c: (clamp(round(x/s)+z) − z)·s} ──► conv{Q_w(W)}

    After::

        x ──► q{folded: clamp(round(x/s)+z) − z} ──► conv'{Q_w(W')}     W'[:, c] = s_c·W[:, c]

    The conv now reads integer-valued codes and its weight quantizer is re-fitted to the
    scaled weights (per output channel), so per-channel activation ranges cost nothing at
    run time: the lowered conv takes uint8 codes with a per-channel zero point
    (fxquant/lower/conv.py). The weights are quantized after the fold, which is the
    semantics fake-quant and every lowered target share. Quantizers whose value feeds
    anything but quantized convs (as their only input) are left unfolded and reported in
    ``ctx.state["fold-input-scales"]``. With ``check``, the float output (quantizers off) on a
    probe input must stay within ``tol`` of the output before the pass.
    """

    name: ClassVar[str] = "fold-input-scales"
    check: bool = True
    tol: float = 1e-5

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        qnodes = [n for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), UniformQuantizer)
                  and gm.get_submodule(n.target).channels is not None
                  and gm.get_submodule(n.target).ch_axis == 1
                  and not gm.get_submodule(n.target).folded]
        check = FloatOutputCheck(gm, ctx, self.check and bool(qnodes))
        report, folded, convs = {}, 0, 0
        for qnode in qnodes:
            quantizer = gm.get_submodule(qnode.target)
            readers, why = _readers(gm, qnode)
            if not readers:
                report[qnode.name] = f"refused: {why}"
                continue
            for user in readers:
                new = fold_input_scale(gm.get_submodule(user.target), quantizer.scale.detach().reshape(-1))
                refit_weight_quantizer(new, ctx)
                install_module(gm, user.target, new)
                convs += 1
            quantizer.fold()
            folded += 1
            report[qnode.name] = f"folded into {', '.join(u.target for u in readers)}"
        gm.recompile()
        ctx.state["fold-input-scales"] = report
        info = {"per_channel_quantizers": len(qnodes), "folded": folded, "convs": convs,
                "refused": len(qnodes) - folded}
        err = check.error() if folded else None
        if err is not None:
            info["max_rel_error"] = err
            if err > self.tol:
                raise PassError(self.name, f"folding the input steps changed the float output by "
                                f"{err:.3g} relative (tolerance {self.tol:g})")
        return PassResult(gm, bool(folded), info)
