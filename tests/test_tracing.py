"""Tracing: SR models trace; untraceable ones get an error naming module, line and fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant import RecipeError, TraceFailure, compile, trace


class DataDependentPad(nn.Module):
    """SwinIR-style padding decided by a Python `if` on a tensor value: not traceable."""

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return x


class NeedsLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.pad = DataDependentPad()
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.pad(self.head(x)))


class MultiScale(nn.Module):
    """CARN-M-like: forward(x, scale) picks an upsampler by the Python value of scale."""

    def __init__(self):
        super().__init__()
        self.entry = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ModuleDict({"2": nn.Conv2d(4, 12, 3, padding=1),
                                 "3": nn.Conv2d(4, 27, 3, padding=1)})

    def forward(self, x, scale):
        return nn.functional.pixel_shuffle(self.up[str(scale)](self.entry(x)), scale)


def test_untraceable_module_error_names_module_line_and_fix():
    with pytest.raises(TraceFailure) as err:
        trace(NeedsLeaf())
    message = str(err.value)
    assert "module 'pad' (DataDependentPad)" in message
    assert "test_tracing.py:" in message and "if x.sum() > 0" in message
    assert 'leaf_modules = ["pad"]' in message


def test_declaring_the_leaf_makes_it_trace_and_run_like_the_model():
    model = NeedsLeaf().eval()
    gm = trace(model, leaf_modules=["pad"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["head", "pad", "tail"]
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


def test_leaf_by_class_name_through_a_recipe():
    model = NeedsLeaf().eval()
    recipe = {"tracing": {"leaf_modules": ["DataDependentPad"]}}
    gm = compile(model, recipe, calib=torch.rand(4, 3, 8, 8), allow_unquantized=True)  # two convs: first/last stay float
    assert "pad" in {n.target for n in gm.graph.nodes if n.op == "call_module"}


def test_unknown_leaf_is_a_recipe_error():
    with pytest.raises(RecipeError, match="'padd' is neither a module name nor a module class"):
        trace(NeedsLeaf(), leaf_modules=["padd"])


def test_forward_with_scale_argument_is_specialised():
    model = MultiScale().eval()
    with pytest.raises(TraceFailure, match="give concrete_args for scale"):
        trace(model)
    gm = trace(model, concrete_args={"scale": 3})
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(gm(x), model(x, 3))
    assert gm(x).shape == (1, 3, 15, 15)
    with pytest.raises(Exception, match="specialized"):
        gm(x, 2)


def test_non_module_is_rejected():
    with pytest.raises(TraceFailure, match="expected a torch.nn.Module"):
        trace(lambda x: x)
