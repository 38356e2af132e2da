"""``observe``: observers sit on exactly the selected conv inputs; outputs are unchanged."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant import PassContext, PassManager, Recipe
from fxquant.inspect import graph_table
from fxquant.observers import HistogramObserver, MinMaxObserver, Observer
from fxquant.quant import UniformQuantizer


def _observe(model, recipe=None, spec="trace,observe"):
    ctx = PassContext(recipe or Recipe())
    return PassManager(spec).run(model, ctx), ctx


def _observed_convs(gm):
    return [next(iter(n.users)).target for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Observer)]


def test_observe_structure(tiny_sr, golden):
    gm, ctx = _observe(tiny_sr)
    golden("tiny_sr.observe.txt", graph_table(gm))
    assert _observed_convs(gm) == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert set(ctx.state["skipped_layers"]) == {"head", "tail"}


def test_observe_is_numerically_identical(tiny_sr):
    gm, _ = _observe(tiny_sr)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), tiny_sr(x))


@pytest.mark.parametrize("layers, expected", [
    ({"keep_first_last": False}, ["head", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "tail"]),
    ({"include": ["blocks.1.*"]}, ["blocks.1.0", "blocks.1.2"]),
    ({"exclude": ["*.2"]}, ["blocks.0.0", "blocks.1.0"]),
])
def test_layer_selection_globs(tiny_sr, layers, expected):
    gm, _ = _observe(tiny_sr, Recipe.from_dict({"layers": layers}))
    assert _observed_convs(gm) == expected


def test_observer_kind_follows_the_recipe_or_the_pass_option(tiny_sr):
    gm, _ = _observe(tiny_sr, Recipe.from_dict({"activations": {"observer": "mse"}}))
    assert all(isinstance(m, HistogramObserver) for m in gm.modules() if isinstance(m, Observer))
    gm, _ = _observe(tiny_sr, spec="trace,observe{observer=minmax,granularity=per-channel}")
    observers = [m for m in gm.modules() if isinstance(m, Observer)]
    assert observers and all(isinstance(m, MinMaxObserver) and m.per_channel for m in observers)


def test_a_tensor_read_by_two_convs_gets_one_shared_observer():
    class Fork(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
            self.c, self.d = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            h = self.a(x)
            return self.d(self.b(h) + self.c(h))

    gm, ctx = _observe(Fork().eval(), Recipe.from_dict({"layers": {"keep_first_last": False}}))
    observers = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), Observer)]
    # x -> a, h -> (b, c), add -> d: three observed tensors, h's observer read by b and c
    assert [n.name for n in observers] == ["a_input_observer", "a_shared_input_observer",
                                           "d_input_observer"]
    assert sorted(u.target for u in observers[1].users) == ["b", "c"]
    assert dict(ctx.history)["observe"] == {"observed": 4, "observers": 3, "skipped": 0}
    # the quantize pass keeps the sharing: one quantizer, both convs' weights quantized
    calib = torch.rand(4, 3, 8, 8)
    gm = fxquant.compile(Fork().eval(), Recipe.from_dict({"layers": {"keep_first_last": False}}),
                         calib=calib)
    shared = gm.get_submodule("a_shared_input_quantizer")
    assert isinstance(shared, UniformQuantizer)
    assert [type(gm.get_submodule(t)).__name__ for t in ("b", "c")] == ["QuantConv2d"] * 2
