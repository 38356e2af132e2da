"""``dfsq-observe``: structure (golden), post-ReLU detection, identity, memory budget."""

from __future__ import annotations

import torch

from fxquant import PassContext, PassManager, Recipe
from fxquant.inspect import graph_table
from fxquant.quant.subset import SampleObserver


def dfsq(bits: int, **options) -> dict:
    return {"method": "dfsq", "weights": {"bits": bits}, "activations": {"bits": bits},
            "options": options}


def test_dfsq_observe_structure(tiny_sr, calib, golden):
    ctx = PassContext(Recipe.from_dict(dfsq(4)), calib=calib)
    gm = PassManager("trace,dfsq-observe").run(tiny_sr, ctx)
    golden("tiny_sr.dfsq-observe.txt", graph_table(gm))
    observers = {n: m for n, m in gm.named_modules() if isinstance(m, SampleObserver)}
    assert sorted(observers) == ["blocks_0_0_input_observer", "blocks_0_2_input_observer",
                                 "blocks_1_0_input_observer", "blocks_1_2_input_observer"]
    # post-ReLU detection from the graph: the second conv of each block reads relu output
    assert {n: o.post_relu for n, o in observers.items()} == {
        "blocks_0_0_input_observer": False, "blocks_0_2_input_observer": True,
        "blocks_1_0_input_observer": False, "blocks_1_2_input_observer": True}
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(gm(x), tiny_sr(x))  # observers are identities


def test_dfsq_observe_respects_the_memory_budget(tiny_sr, calib):
    recipe = Recipe.from_dict(dfsq(4, memory_mb=0.01))  # 10485 bytes for 4 layers × 8 channels
    ctx = PassContext(recipe, calib=calib)
    gm = PassManager("trace,dfsq-observe,calibrate").run(tiny_sr, ctx)
    cap = int(0.01 * 2 ** 20) // (4 * 32)
    assert ctx.history[1][1]["samples_per_channel"] == cap == 81
    observers = [m for m in gm.modules() if isinstance(m, SampleObserver)]
    assert all(m.values.shape == (8, cap) and m.seen == 16 * 12 * 12 for m in observers)
