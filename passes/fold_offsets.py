"""``fold-offsets``: fold trained ODM offsets into the convs that produce their inputs, so the
deployed graph has no extra op (the counterpart of ``inject-offsets``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.errors import PassError
from fxquant.passes.inject_offsets import fold_site
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant.offsets import ChannelOffset, fold_into_conv


@register_pass
@dataclass(frozen=True)
class FoldOffsetsPass(Pass):
    """Remove every :class:`ChannelOffset`, folding ``γ·x + β`` into the conv before it
    (``W' = γ·W``, ``b' = γ·b + β``, a per-channel weight grid scaled by γ)::

        c1 ──► relu ──► c2_input_offset ──► c2_input_quantizer      c1' ──► relu
                                                             ──►       ──► c2_input_quantizer

    Exact up to float rounding: a scale passes a ReLU/LeakyReLU/PReLU only while γ > 0, and a
    fake-quant grid scaled by γ > 0 is the same grid of the scaled weights; a γ ≤ 0 after
    training is an error naming the offset.
    """

    name: ClassVar[str] = "fold-offsets"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        folded = 0
        for node in list(gm.graph.nodes):
            offset = gm.get_submodule(node.target) if node.op == "call_module" else None
            if not isinstance(offset, ChannelOffset):
                continue
            conv_node, why = fold_site(gm, node.args[0], offset.kind)
            if conv_node is None:
                raise PassError(self.name, f"cannot fold: {why}", node=node.name)
            bad = int((offset.gamma <= 0).sum())
            if bad:
                raise PassError(self.name, f"{bad} channels have a scale <= 0 after training; "
                                "a non-positive scale does not pass the activation or the "
                                "weight grid unchanged", node=node.name)
            fold_into_conv(gm.get_submodule(conv_node.target), offset.gamma.detach(),
                           offset.beta.detach())
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            folded += 1
        gm.delete_all_unused_submodules()
        gm.recompile()
        return PassResult(gm, bool(folded), {"folded": folded})
