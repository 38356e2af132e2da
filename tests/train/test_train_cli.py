"""``fxquant train`` end to end on an own tiny model (needs the data root: T91/General100
patches, Set5 evaluation): the run folder's files, a trained model that loads and evaluates,
a crashed run resumed with --resume to the same weights as an uninterrupted one, a
--compiled start, and named errors for a missing or double start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxquant
from fxquant.cli import main
from fxquant.train.qat import QATTrainer

pytestmark = [pytest.mark.data, pytest.mark.usefixtures("one_thread")]
MODEL = str(Path(__file__).parent.parent / "fixtures" / "tiny_sr.py") + ":TinySR"
COMMON = ["--steps", "4", "--batch-size", "2", "--patch", "12", "--lr", "1e-3",
          "--checkpoint-every", "2", "--log-every", "1", "--quiet", "--device", "cpu"]


def tiny_class():
    from importlib import util

    spec = util.spec_from_file_location("tiny_fixture", MODEL.rpartition(":")[0])
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinySR


@pytest.fixture
def weights(tmp_path) -> str:
    """Fixed weights, so that every run starts from the same float model."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(tiny_class()().state_dict(), path)
    return str(path)


def train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *COMMON, *extra])


def state(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_train_writes_a_run_folder_and_a_loadable_model(data, tmp_path, capsys, weights):
    code = train(data, tmp_path / "run", "--model", MODEL, "--weights", weights,
                 "--recipe", "minmax-w4a4",
                 "--eval-every", "2", "--eval-limit", "1", "--teacher-weight", "0.1", "--json")
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and [e["step"] for e in summary["evaluations"]] == [0, 2, 4]
    assert all(e["eval_set"] == "Set5" and e["psnr"] > 20 for e in summary["evaluations"])
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {"last.ckpt", "metrics.jsonl", "model.fxq", "best.fxq"}


def test_resume_after_a_crash_matches_the_uninterrupted_run(data, tmp_path, monkeypatch,
                                                            weights):
    start = ["--model", MODEL, "--weights", weights, "--recipe", "minmax-w4a4",
             "--teacher-weight", "0.2", "--channels-last"]
    assert train(data, tmp_path / "full", *start) == 0
    original = QATTrainer.train_step

    def crash_at_three(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(QATTrainer, "train_step", crash_at_three)
    with pytest.raises(KeyboardInterrupt):
        train(data, tmp_path / "crashed", *start)
    monkeypatch.setattr(QATTrainer, "train_step", original)
    assert torch.load(tmp_path / "crashed/last.ckpt", weights_only=True)["step"] == 2
    assert train(data, tmp_path / "crashed", "--resume", str(tmp_path / "crashed/last.ckpt"),
                 "--model", MODEL) == 0  # the weights' path comes from the checkpoint
    a, b = state(tmp_path / "full/model.fxq"), state(tmp_path / "crashed/model.fxq")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the result is an ordinary compiled model
    gm = fxquant.load(tmp_path / "crashed/model.fxq", model=tiny_class()())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert fxquant.lowered_copy(gm, "reference")(x).shape == (1, 3, 16, 16)


def test_a_compiled_start_and_named_errors(data, tmp_path, capsys, weights):
    assert main(["compile", "--model", MODEL, "--weights", weights, "--recipe", "minmax-w4a4",
                 "--data", str(data), "--out", str(tmp_path / "ptq.fxq")]) == 0
    assert train(data, tmp_path / "run", "--compiled", str(tmp_path / "ptq.fxq"),
                 "--model", MODEL) == 0
    assert (tmp_path / "run/model.fxq").is_file()
    capsys.readouterr()
    assert train(data, tmp_path / "x", "--model", MODEL) == 2
    assert "give one start: --model/--scale with --recipe" in capsys.readouterr().err
    assert train(data, tmp_path / "x", "--model", MODEL, "--recipe", "minmax-w4a4",
                 "--compiled", str(tmp_path / "ptq.fxq")) == 2
    assert "(got --compiled, --recipe)" in capsys.readouterr().err


@pytest.mark.parametrize("flags,named", [(["--eval-set", "Set14"], "--eval-set"),
                                         (["--eval-limit", "2"], "--eval-limit")])
def test_evaluation_flags_without_eval_every_are_refused(data, tmp_path, capsys, weights, flags,
                                                          named):
    """They would be ignored silently: periodic evaluation is off unless --eval-every is set."""
    assert train(data, tmp_path / "run", "--model", MODEL, "--weights", weights, "--recipe",
                 "minmax-w4a4", *flags) == 2
    assert f"{named} applies to periodic evaluation, which is off: add --eval-every N" in \
        capsys.readouterr().err
    assert not (tmp_path / "run" / "model.fxq").exists()


@pytest.mark.parametrize("flags, message", [
    (["--sets", "T91,T92"], "train set 'T92' not found"),
    (["--eval-every", "2", "--eval-set", "Set6"], "benchmark set 'Set6' not found"),
])
def test_misspelt_sets_are_named_before_the_start_is_built(data, tmp_path, capsys, monkeypatch,
                                                           flags, message):
    """The sets used to be read after the PTQ start, which can compile for minutes."""
    def no_work(*args, **kwargs):
        raise AssertionError("the sets must be checked before the start is built")

    monkeypatch.setattr("fxquant.workflow.prepare", no_work)
    assert train(data, tmp_path / "run", "--model", MODEL, "--recipe", "minmax-w4a4",
                 *flags) == 2
    assert message in capsys.readouterr().err
