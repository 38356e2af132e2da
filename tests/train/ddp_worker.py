"""Run by tests/train/test_ddp.py under ``torchrun --nproc_per_node 2 --standalone``: a few
QAT steps of the tiny model with DDP (gloo), each rank saving its final state to
``<out>/rank<r>.pt`` and rank 0 also writing the run folder ``<out>/run``; then the same
with a ``backward`` hook (gradients set by the hook, averaged by the trainer) to
``<out>/rank<r>-hook.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fxquant.train.distributed import setup
from fxquant.train.qat import QATTrainer

from qat_helpers import ReconOnly, compiled, config, float_model, sampler

STEPS, BATCH = 6, 4


def settings(**changes):
    return config(steps=STEPS, batch_size=BATCH, log_every=1, checkpoint_every=3, **changes)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    world = setup("cpu")
    model = float_model()
    trainer = QATTrainer(compiled(model), model, settings(), sampler=sampler(), scale=2,
                         world=world, out_dir=out / "run")
    trainer.run()
    torch.save({"rank": world.rank, "world": world.size, "device": str(world.device),
                "state": trainer.gm.state_dict(), "metrics": trainer.metrics},
               out / f"rank{world.rank}.pt")
    trainer.release()
    hooked = QATTrainer(compiled(model), model, settings(backward=ReconOnly(average=True)),
                        sampler=sampler(), scale=2, world=world)
    hooked.run()
    torch.save({"state": hooked.gm.state_dict()}, out / f"rank{world.rank}-hook.pt")
    hooked.release()
    world.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
