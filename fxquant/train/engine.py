"""The training loop shared by reconstruction PTQ (the ``reconstruct`` pass) and QAT.

:class:`Trainer` runs Adam over given parameters for a number of steps on batches drawn from
a list of training batches, with

- **determinism**: batches are drawn by a seeded generator, so a fixed seed and thread count
  give identical parameters;
- **early stop**: every ``eval_every`` steps the loss on held-out batches is measured; the
  best parameters so far are kept and restored at the end, and training stops after
  ``patience`` evaluations without improvement;
- **progress** (tqdm, with the loss) and a loss **history** (step, train loss, held-out loss);
- **resumable state**: :meth:`state_dict` holds the step, optimizer, sampler RNG, best
  parameters and history; a trainer built the same way and given that state continues
  exactly where the first stopped.

It knows nothing about graphs or quantizers: the caller supplies the parameters and a loss
function of a batch.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from fxquant.heap import keep_freed_blocks

Batch = tuple


def to_layout(values: tuple, layout: torch.memory_format) -> tuple:
    """``values`` with every 4-D tensor in ``layout`` (no copy when it already is)."""
    if layout == torch.contiguous_format:
        return values
    return tuple(v.contiguous(memory_format=layout)
                 if isinstance(v, torch.Tensor) and v.ndim == 4 else v for v in values)


@dataclass
class TrainConfig:
    steps: int = 500
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 50
    patience: int = 4
    cosine: bool = True  # cosine decay of the learning rate to 0 over ``steps``

    def validate(self, where: str = "train") -> None:
        from fxquant.errors import RecipeError

        if self.steps < 1 or self.eval_every < 1 or self.patience < 1:
            raise RecipeError(f"{where}: steps, eval_every and patience must be >= 1 (got "
                              f"{self.steps}, {self.eval_every}, {self.patience})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RecipeError(f"{where}.lr = {self.lr} must be a positive number")


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_heldout: float
    first_heldout: float
    stopped_early: bool
    history: list[tuple[int, float, float | None]] = field(default_factory=list)


class Trainer:
    """Adam on ``params`` minimising ``loss_fn(batch)`` over ``train`` batches; ``heldout``
    batches decide the early stop and which parameters are kept."""

    def __init__(self, groups: Sequence[dict], loss_fn: Callable[[Batch], torch.Tensor],
                 train: list[Batch], heldout: list[Batch], config: TrainConfig, *,
                 progress: bool = False, desc: str = "train",
                 after_step: Callable[[], None] | None = None):
        """``groups``: dicts with ``params`` and an optional ``lr_scale`` (the group's
        learning rate is ``config.lr · lr_scale``, e.g. a quantizer step's magnitude)."""
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("nothing to train: no parameters were given")
        if not train:
            raise ValueError("nothing to train on: no training batches")
        self.loss_fn, self.train, self.heldout = loss_fn, train, heldout or train[:1]
        self.config, self.progress, self.desc = config, progress, desc
        self.after_step = after_step  # e.g. projecting parameters back into their domain
        self.optimizer = torch.optim.Adam(
            [{"params": list(g["params"]), "lr_scale": float(g.get("lr_scale", 1.0))}
             for g in groups], lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.best: list[torch.Tensor] | None = None
        self.best_step, self.best_loss, self.first_loss = 0, math.inf, math.nan
        self.bad_evals = 0
        self.running: float | None = None  # smoothed training loss, shown and logged
        self.history: list[tuple[int, float, float | None]] = []

    def _lr(self) -> float:
        if not self.config.cosine:
            return self.config.lr
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * self.step / self.config.steps))

    def heldout_loss(self) -> float:
        with torch.no_grad():
            return sum(float(self.loss_fn(b)) for b in self.heldout) / len(self.heldout)

    def _evaluate(self, train_loss: float) -> bool:
        """Record the held-out loss; keep the best parameters; True when patience ran out."""
        loss = self.heldout_loss()
        self.history.append((self.step, train_loss, loss))
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
            self.best = [p.detach().clone() for p in self.params]
            return False
        self.bad_evals += 1
        return self.bad_evals >= self.config.patience

    def run(self, until: int | None = None) -> TrainResult | None:
        """Train to ``config.steps`` (or an early stop) and load the best parameters; with
        ``until``, pause after that step instead (None returned; :meth:`state_dict` then
        holds everything needed to go on)."""
        end = self.config.steps if until is None else min(until, self.config.steps)
        keep_freed_blocks()  # each step's large blocks are reused instead of faulted in anew
        if self.step == 0:
            self.first_loss = self.heldout_loss()
            self.best_loss, self.best = self.first_loss, [p.detach().clone() for p in self.params]
        stopped = False
        bar = tqdm(total=self.config.steps, initial=self.step, desc=self.desc,
                   disable=not self.progress, leave=False)
        while self.step < end:
            index = int(torch.randint(len(self.train), (1,), generator=self.generator))
            for group in self.optimizer.param_groups:
                group["lr"] = self._lr() * group["lr_scale"]
            self.optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():  # also when called under no_grad
                loss = self.loss_fn(self.train[index])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.desc}: the loss became {float(loss.detach())} at "
                                             f"step {self.step}; lower the learning rate")
                loss.backward()
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step()
            self.step += 1
            value = float(loss.detach())
            self.running = value if self.running is None else 0.9 * self.running + 0.1 * value
            bar.update(1)
            bar.set_postfix(loss=f"{self.running:.4g}")
            if self.step % self.config.eval_every == 0 or self.step == self.config.steps:
                if self._evaluate(self.running):
                    stopped = True
                    break
        bar.close()
        if not stopped and self.step < self.config.steps:
            return None
        with torch.no_grad():
            for p, best in zip(self.params, self.best):
                p.copy_(best)
        return TrainResult(self.step, self.best_step, self.best_loss, self.first_loss, stopped,
                           list(self.history))

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "params": [p.detach().clone() for p in self.params],
                "best": None if self.best is None else [b.clone() for b in self.best],
                "best_step": self.best_step, "best_loss": self.best_loss,
                "first_loss": self.first_loss, "bad_evals": self.bad_evals,
                "running": self.running,
                "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        with torch.no_grad():
            for p, value in zip(self.params, state["params"]):
                p.copy_(value)
        self.best = None if state["best"] is None else [b.clone() for b in state["best"]]
        self.best_step, self.best_loss = state["best_step"], state["best_loss"]
        self.first_loss, self.bad_evals = state["first_loss"], state["bad_evals"]
        self.running = state["running"]
        self.history = copy.deepcopy(state["history"])
