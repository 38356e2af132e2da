"""ODM through ``fxquant train``'s trainer: an odm recipe brings its regularizer and
cooperative backward by itself, offsets train, a resumed ODM run is bit-identical, and the
saved result has its offsets folded away (plain QAT's graph, same outputs)."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.quant.offsets import ChannelOffset
from fxquant.train.methods import deployable
from fxquant.train.qat import QATTrainer

from qat_helpers import config, float_model, sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def odm_compiled(model, version="v1"):
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    recipe = fxquant.resolve_recipe(f"odm-{version}-w4a4")
    if version == "v1":  # every foldable site, so the tiny net gets an offset
        recipe.pipeline = "trace,observe,calibrate,quantize,inject-offsets{threshold=0},verify"
    return fxquant.compile(model, recipe, calib=calib)


def offsets(gm):
    return [m for m in gm.modules() if isinstance(m, ChannelOffset)]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_odm_recipe_trains_with_its_regularizer(version):
    model = float_model()
    gm = odm_compiled(model, version)
    trainer = QATTrainer(gm, model, config(steps=4, log_every=1), sampler=sampler(), scale=2)
    names = [getattr(r, "name", "") for r in trainer.config.regularizers]
    assert names == ["odm_variance" if version == "v1" else "odm_mismatch"]
    assert trainer.config.backward is not None
    before = [o.gamma.detach().clone() for o in offsets(gm)]
    trainer.run()
    rows = [r for r in trainer.metrics if names[0] in r]
    assert len(rows) == 4 and all("agreement" in r for r in rows)
    if version == "v1":
        assert before and any(not torch.equal(b, o.gamma) for b, o in zip(before, offsets(gm)))


def test_a_resumed_odm_run_is_bit_identical(tmp_path):
    settings = config(steps=6, checkpoint_every=3, log_every=1)
    model = float_model()
    full = QATTrainer(odm_compiled(model), model, settings, sampler=sampler(), scale=2)
    full.run()
    first = QATTrainer(odm_compiled(model), model, settings, sampler=sampler(), scale=2,
                       out_dir=tmp_path)
    first.run(until=3)
    del first
    resumed = QATTrainer.from_checkpoint(tmp_path / "last.ckpt", float_model(),
                                         sampler=sampler(), scale=2)
    resumed.run()
    full_state, resumed_state = full.gm.state_dict(), resumed.gm.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert any("offset" in k for k in full_state)
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)


def test_the_saved_result_has_its_offsets_folded(tmp_path):
    model = float_model()
    gm = odm_compiled(model)
    trainer = QATTrainer(gm, model, config(steps=3), sampler=sampler(), scale=2,
                         out_dir=tmp_path)
    trainer.run()
    assert offsets(gm)  # the training graph keeps them
    saved = fxquant.load(tmp_path / "model.fxq", model=float_model())
    assert offsets(saved) == []
    plain = fxquant.compile(float_model(), "mse-w4a4",
                            calib=torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1)))
    assert len(saved.graph.nodes) == len(plain.graph.nodes)
    x = torch.rand(1, 3, 10, 10)
    with torch.no_grad():
        ref, out = gm(x), saved(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert offsets(deployable(gm)) == []
