"""Exact resume of a QAT run: what a trainer's checkpoint holds (the graph's state dict, Adam,
the LR scheduler, the sampling generator, torch's RNG, the step, the metrics, the hooks'
states), loading one back, and rebuilding a trainer from a checkpoint file. These are the
methods of :class:`Resumable`, a base of :class:`fxquant.train.qat.QATTrainer`."""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxquant.train.checkpoint import load_model_state, read_checkpoint, rebuild, write_checkpoint
from fxquant.train.config import QATConfig, TrainError, regularizer_names
from fxquant.train.methods import method_hooks

if TYPE_CHECKING:
    from fxquant.train.qat import QATTrainer


# settings a resumed run may change (they do not change what is trained)
RESUME_MAY_CHANGE = ("eval_every", "eval_set", "eval_limit", "checkpoint_every", "log_every")


class Resumable:
    """The checkpoint half of :class:`~fxquant.train.qat.QATTrainer`, which sets the state
    these methods save and load (``gm``, ``optimizer``, ``scheduler``, ``generator``, ...)."""

    def checkpoint(self) -> dict:
        return {"compiled": self.info, "state_dict": self.gm.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "step": self.step, "metrics": copy.deepcopy(self.metrics),
                "best_psnr": self.best_psnr, "config": self.config.to_dict(),
                "world_size": self.world.size,
                "regularizers": {n: r.state_dict() for n, r in self._hooks()
                                 if hasattr(r, "state_dict")}}

    def _hooks(self) -> list[tuple[str, Any]]:
        hooks = list(self.config.regularizers)
        hooks += [self.config.backward] if self.config.backward is not None else []
        return list(zip(regularizer_names(hooks), hooks))

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        write_checkpoint(path, self.checkpoint())

    def load_checkpoint(self, payload: dict, where: str = "checkpoint") -> None:
        mine = self.config.to_dict()
        # a setting newer than the checkpoint was at its default when the checkpoint was written
        saved = {**QATConfig().to_dict(), **payload["config"]}
        differ = sorted(k for k in mine if k not in RESUME_MAY_CHANGE and saved[k] != mine[k])
        if differ:
            raise TrainError(f"{where} was trained with other settings: "
                             + ", ".join(f"{k}={saved[k]!r} (now {mine[k]!r})" for k in differ)
                             + f"; only {', '.join(RESUME_MAY_CHANGE)} may change on resume")
        load_model_state(self.gm, payload["state_dict"], where)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.generator.set_state(payload["generator"])
        torch.set_rng_state(payload["torch_rng"])
        self.step, self.best_psnr = int(payload["step"]), float(payload["best_psnr"])
        self.metrics = copy.deepcopy(payload["metrics"])
        states = payload.get("regularizers") or {}
        for name, r in self._hooks():
            if name in states and hasattr(r, "load_state_dict"):
                r.load_state_dict(states[name])

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, float_model: nn.Module, *,
                        regularizers: list | None = None, backward: Any = None,
                        changes: dict | None = None,
                        **kwargs) -> "QATTrainer":
        """A trainer that continues the run saved at ``path``: the graph rebuilt on a copy of
        ``float_model`` and every state loaded. ``changes``: new values of
        ``RESUME_MAY_CHANGE`` settings; ``kwargs`` as for the constructor (not ``config``)."""
        payload = read_checkpoint(path)
        changes = dict(changes or {})
        refused = sorted(set(changes) - set(RESUME_MAY_CHANGE))
        if refused:
            raise TrainError(f"cannot change {refused} when resuming {path}; only "
                             f"{', '.join(RESUME_MAY_CHANGE)} may change")
        gm = rebuild(payload["compiled"], float_model, str(path))
        if not regularizers and backward is None:
            regularizers, backward = method_hooks(gm)  # the method's own hooks (ODM)
        config = QATConfig.from_dict({**payload["config"], **changes}, regularizers, backward)
        for key, now in config.to_dict().items():
            if key in ("regularizers", "backward") and now != payload["config"].get(key):
                raise TrainError(f"{path} was trained with {key} {payload['config'].get(key)}; "
                                 f"pass the same again (got {now})")
        info = payload["compiled"]["model"]
        kwargs.setdefault("model_info", {"model_name": info.get("name"),
                                         "scale": info.get("scale"),
                                         "user_model": info.get("user")})
        trainer = cls(gm, float_model, config, **kwargs)
        trainer.load_checkpoint(payload, str(path))
        return trainer
