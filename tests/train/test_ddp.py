"""DDP: ``torchrun --nproc_per_node 2 --standalone`` (gloo) trains the tiny model for a few
steps; every parameter and buffer is identical on both ranks, and matches a single-process
run on the same global batch up to float summation order, with DDP's own gradient
averaging and with a ``backward`` hook's gradients averaged by the trainer. Rank 0 alone writes the run
folder, and its logged loss is the mean over ranks (the global batch's loss)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxquant.train.qat import QATTrainer

from qat_helpers import compiled, float_model, sampler
from ddp_worker import STEPS, settings

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def test_two_ranks_agree_with_each_other_and_with_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", str(HERE / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    for key in a:  # parameters and buffers: bit-identical across ranks
        assert torch.equal(a[key], b[key]), key

    model = float_model()
    single = QATTrainer(compiled(model), model, settings(), sampler=sampler(), scale=2)
    single.run()
    ref = single.gm.state_dict()
    # DDP averages the two half-batch gradients; one process averages the whole batch in
    # another order, so gradients differ by float rounding (~1e-7 relative). Each Adam step
    # moves a parameter by up to ~lr = 2e-3, so a run that went another way would differ by
    # O(1e-3); after 6 steps the rounding drift measured 1.8e-8 at most. 1e-6 leaves 50x
    # margin over the drift and is 2000x below one step's movement.
    worst = max(float((a[k].float() - ref[k].float()).abs().max()) for k in ref)
    assert worst < 1e-6, worst
    # a backward hook (gradients set by the hook, then averaged by the trainer) too
    hooked = [torch.load(tmp_path / f"rank{r}-hook.pt", weights_only=True)["state"]
              for r in (0, 1)]
    assert all(torch.equal(hooked[0][k], hooked[1][k]) for k in ref)
    assert max(float((hooked[0][k] - ref[k]).abs().max()) for k in ref) < 1e-6
    losses = [r["loss"] for r in ranks[0]["metrics"]]
    assert losses == pytest.approx([r["loss"] for r in single.metrics], rel=1e-5)
    assert ranks[1]["metrics"] == []  # rank 1 keeps no log
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["last.ckpt", "metrics.jsonl", "model.fxq"]
    assert torch.load(run / "last.ckpt", weights_only=True)["step"] == STEPS
