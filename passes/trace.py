"""``trace``: turn the model into a GraphModule."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.tracing import trace


@register_pass
@dataclass(frozen=True)
class TracePass(Pass):
    """Symbolically trace an ``nn.Module`` (a GraphModule passes through unchanged).

    Before: ``model`` (any nn.Module). After: a GraphModule with one node per op; leaf
    modules from ``recipe.tracing.leaf_modules`` stay single ``call_module`` nodes and
    ``ctx.concrete_args`` are specialised. Outputs are unchanged. A copy of the float graph
    is kept in ``ctx.state["float_model"]`` (the teacher of the ``reconstruct`` pass).
    """

    name: ClassVar[str] = "trace"

    def __call__(self, module, ctx: PassContext) -> PassResult:
        if isinstance(module, fx.GraphModule):
            return PassResult(module, False, {"nodes": len(module.graph.nodes)})
        gm = trace(module, ctx.recipe.tracing.leaf_modules, ctx.concrete_args)
        if ctx.calibrate:  # a model rebuilt for loading trains nothing
            ctx.state["float_model"] = copy.deepcopy(gm).eval()
        return PassResult(gm, True, {"nodes": len(gm.graph.nodes)})
