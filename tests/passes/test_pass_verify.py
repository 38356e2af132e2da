"""``verify``: catches left-over observers and non-finite outputs; changes nothing."""

from __future__ import annotations

import pytest
import torch

from fxquant import PassContext, PassError, PassManager, Recipe
from fxquant.inspect import graph_table


def test_verify_rejects_left_over_observers(tiny_sr):
    with pytest.raises(PassError, match=r"pass 'verify' failed at node 'blocks_0_0_input_observer'"):
        PassManager("trace,observe,verify").run(tiny_sr, PassContext(Recipe()))
    PassManager("trace,observe,verify{allow_observers=true}").run(tiny_sr, PassContext(Recipe()))


def test_verify_runs_example_inputs_and_rejects_non_finite_output(tiny_sr):
    with torch.no_grad():
        tiny_sr.tail.bias.fill_(float("inf"))
    ctx = PassContext(Recipe(), example_inputs=(torch.rand(1, 3, 8, 8),))
    with pytest.raises(PassError, match="output is not finite"):
        PassManager("trace,verify").run(tiny_sr, ctx)


def test_verify_changes_nothing(tiny_sr, calib):
    ctx = PassContext(Recipe(), calib=calib, example_inputs=(calib[:1],))
    gm = PassManager("trace,observe,calibrate,quantize").run(tiny_sr, ctx)
    before = graph_table(gm)
    x = torch.rand(1, 3, 8, 8)
    out = gm(x)
    gm = PassManager("verify").run(gm, ctx)
    assert graph_table(gm) == before and torch.equal(gm(x), out)
    assert ctx.history[-1] == ("verify", {"quantizers": 4})
