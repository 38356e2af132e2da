"""Exact resume: N steps, a checkpoint file, a new trainer rebuilt from that file alone
(graph, Adam, scheduler, sampling generator, metrics) and N more steps end bit-identical
to 2N uninterrupted steps; a crash while writing keeps the previous checkpoint."""

from __future__ import annotations

import pytest
import torch

import fxquant.files
from fxquant.train.checkpoint import read_checkpoint
from fxquant.train.config import TrainError
from fxquant.train.qat import QATTrainer

from qat_helpers import compiled, config, float_model, sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def without_time(metrics):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in metrics]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("changes", [
    dict(schedule="cosine", teacher_weight=0.3),
    dict(schedule="step", step_size=3, gamma=0.5, quantizer_lr=5.0, grad_clip=0.5),
    dict(schedule="cosine", channels_last=True),
])
def test_resumed_run_is_bit_identical_to_the_uninterrupted_one(tmp_path, changes):
    settings = config(steps=10, checkpoint_every=5, log_every=1, **changes)
    model = float_model()
    full = QATTrainer(compiled(model), model, settings, sampler=sampler(), scale=2)
    full.run()

    first = QATTrainer(compiled(model), model, settings, sampler=sampler(), scale=2,
                       out_dir=tmp_path)
    first.run(until=5)  # writes last.ckpt at step 5 (checkpoint_every)
    del first
    payload = read_checkpoint(tmp_path / "last.ckpt")  # weights_only=True
    assert payload["step"] == 5 and len(payload["metrics"]) == 5
    resumed = QATTrainer.from_checkpoint(tmp_path / "last.ckpt", float_model(),
                                         sampler=sampler(), scale=2)
    assert resumed.step == 5
    resumed.run()
    assert resumed.step == full.step == 10
    assert_same_state(resumed.gm.state_dict(), full.gm.state_dict())
    opt_a, opt_b = resumed.optimizer.state_dict(), full.optimizer.state_dict()
    for i in opt_a["state"]:
        assert_same_state(opt_a["state"][i], opt_b["state"][i])
    assert torch.equal(resumed.generator.get_state(), full.generator.get_state())
    assert resumed.scheduler.state_dict() == full.scheduler.state_dict()
    assert without_time(resumed.metrics) == without_time(full.metrics)


def test_checkpoint_holds_plain_data_only(tmp_path):
    model = float_model()
    trainer = QATTrainer(compiled(model), model, config(), sampler=sampler(), scale=2)
    trainer.run(until=2)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    payload = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert payload["format"] == "fxquant-train/1"
    assert isinstance(payload["generator"], torch.Tensor)
    assert set(payload) >= {"compiled", "state_dict", "optimizer", "scheduler", "generator",
                            "torch_rng", "step", "metrics", "config"}


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = float_model()
    trainer = QATTrainer(compiled(model), model, config(), sampler=sampler(), scale=2)
    trainer.run(until=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()
    trainer.run(until=4)

    def interrupted(fd):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the bytes, before the rename

    monkeypatch.setattr(fxquant.files.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left
    assert read_checkpoint(tmp_path / "last.ckpt")["step"] == 2


def test_bad_checkpoints_and_changed_settings_are_named(tmp_path):
    with pytest.raises(TrainError, match="does not exist; give the last.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(TrainError, match="cannot read training checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"format": "something-else"}, tmp_path / "other.ckpt")
    with pytest.raises(TrainError, match="not an fxquant training checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")
    model = float_model()
    trainer = QATTrainer(compiled(model), model, config(), sampler=sampler(), scale=2)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    with pytest.raises(TrainError, match=r"cannot change \['lr'\] when resuming"):
        QATTrainer.from_checkpoint(tmp_path / "c.ckpt", model, changes={"lr": 1.0},
                                   sampler=sampler(), scale=2)
    other = QATTrainer(compiled(model), model, config(lr=0.5), sampler=sampler(), scale=2)
    with pytest.raises(TrainError, match=r"other settings: lr=0.002 \(now 0.5\)"):
        other.load_checkpoint(read_checkpoint(tmp_path / "c.ckpt"))
    # a checkpoint written before a setting existed resumes with that setting's default only
    older = read_checkpoint(tmp_path / "c.ckpt")
    del older["config"]["channels_last"]
    QATTrainer(compiled(model), model, config(), sampler=sampler(), scale=2).load_checkpoint(older)
    layout = QATTrainer(compiled(model), model, config(channels_last=True), sampler=sampler(),
                        scale=2)
    with pytest.raises(TrainError, match=r"channels_last=False \(now True\)"):
        layout.load_checkpoint(older)
