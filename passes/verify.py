"""``verify``: check that the graph is complete and, given example inputs, runs finite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from fxquant.errors import PassError
from fxquant.observers import Observer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass, verify_graph
from fxquant.quant.base import Quantizer


@register_pass
@dataclass(frozen=True)
class VerifyPass(Pass):
    """Structural and numeric sanity check; never changes the graph.

    Fails if an observer is left over (``allow_observers`` false), and, when
    ``ctx.example_inputs`` is given, if the graph's output is not finite.
    """

    name: ClassVar[str] = "verify"
    allow_observers: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        verify_graph(gm)
        quantizers = 0
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, Observer) and not self.allow_observers:
                raise PassError(self.name, "observer left in the graph: run 'quantize' after "
                                "'observe'", node=node.name)
            quantizers += isinstance(module, Quantizer)
        if ctx.example_inputs is not None and ctx.calibrate:
            with torch.no_grad():
                out = gm(*ctx.example_inputs)
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            if not all(torch.isfinite(o).all() for o in outputs if isinstance(o, torch.Tensor)):
                raise PassError(self.name, "output is not finite on the example inputs")
        return PassResult(gm, False, {"quantizers": quantizers})
