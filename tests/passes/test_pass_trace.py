"""``trace``: structure (golden) and numerics (identical outputs)."""

from __future__ import annotations

import torch

from fxquant import PassContext, PassManager, Recipe
from fxquant.inspect import graph_table


def test_trace_structure(tiny_sr, golden):
    gm = PassManager("trace").run(tiny_sr, PassContext(Recipe()))
    golden("tiny_sr.trace.txt", graph_table(gm))


def test_trace_is_numerically_identical(tiny_sr):
    gm = PassManager("trace").run(tiny_sr, PassContext(Recipe()))
    x = torch.randn(2, 3, 9, 7)
    assert torch.equal(gm(x), tiny_sr(x))


def test_trace_passes_a_graph_module_through(tiny_sr):
    ctx = PassContext(Recipe())
    gm = PassManager("trace").run(tiny_sr, ctx)
    assert PassManager("trace").run(gm, ctx) is gm
