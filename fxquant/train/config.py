"""The settings of quantization-aware training (:class:`QATConfig`) and its error type."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from fxquant.calibration import MIN_PATCH_SIDE
from fxquant.errors import FxquantError

SCHEDULES = ("cosine", "step", "constant")


class TrainError(FxquantError, ValueError):
    """A training setting, checkpoint or run cannot be used: names the setting and what is
    valid."""


@dataclass
class QATConfig:
    """Quantization-aware training of a compiled model (see :mod:`fxquant.train.qat`).

    ``batch_size`` is the global batch: under ``torchrun`` each of the ``world`` ranks takes
    ``batch_size / world`` of it. ``patch`` is the LR patch side (HR: ``patch · scale``).
    ``quantizer_lr`` multiplies ``lr`` for the quantizers' parameters (steps, levels); 0
    keeps them frozen (the weights alone train).
    ``teacher_weight`` adds ``teacher_weight · |y_q − y_fp|₁`` (the float model's output as a
    second target); 0 leaves the float model out of the loss. ``hr_weight`` weighs the HR
    term ``|y_q − hr|₁``; 0 with a ``teacher_weight`` is pure distillation (the float
    model's output the only target, as reconstruction PTQ trains). ``schedule``: ``cosine``
    (to 0 over ``steps``), ``step`` (× ``gamma`` every ``step_size`` steps) or ``constant``.
    ``eval_every = 0`` / ``checkpoint_every = 0`` turn periodic evaluation / checkpoints off
    (a final checkpoint is still written when there is an output folder).
    ``channels_last`` feeds the model channels-last patches (the layout carries through the
    convs and quantizers; on CPU the conv backward is faster that way).
    ``regularizers`` are callables added to the loss and ``backward`` an optional callable
    that sets the gradients itself (:mod:`fxquant.train.hooks`); neither is saved: pass
    them again on resume.
    """

    steps: int = 1000
    batch_size: int = 16
    patch: int = 48
    lr: float = 1e-4
    quantizer_lr: float = 1.0
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 250
    gamma: float = 0.5
    teacher_weight: float = 0.0
    hr_weight: float = 1.0
    grad_clip: float = 0.0
    sets: tuple[str, ...] = ("T91", "General100")
    augment: bool = True
    seed: int = 0
    eval_every: int = 0
    eval_set: str = "Set5"
    eval_limit: int | None = None
    checkpoint_every: int = 0
    log_every: int = 10
    channels_last: bool = False
    regularizers: list[Callable[[Any], Any]] = field(default_factory=list)
    backward: Callable[..., Any] | None = None

    def validate(self) -> "QATConfig":
        def need(ok: bool, name: str, valid: str) -> None:
            if not ok:
                raise TrainError(f"train: {name} = {getattr(self, name)!r} is invalid; {valid}")

        for name in ("steps", "batch_size", "step_size", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                 "give an integer >= 1")
        need(isinstance(self.patch, int) and self.patch >= MIN_PATCH_SIDE, "patch",
             f"give an LR patch side >= {MIN_PATCH_SIDE}: a 3x3 conv on a smaller patch sees "
             "mostly zero padding")
        for name in ("eval_every", "checkpoint_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name,
                 "give an integer >= 0 (0 = never)")
        need(self.eval_limit is None or (isinstance(self.eval_limit, int) and self.eval_limit >= 1),
             "eval_limit", "give an integer >= 1 or None (the whole set)")
        for name in ("augment", "channels_last"):
            need(isinstance(getattr(self, name), bool), name, "give true or false")
        need(isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr), "lr",
             "give a positive finite number")
        need(isinstance(self.quantizer_lr, (int, float)) and self.quantizer_lr >= 0
             and math.isfinite(self.quantizer_lr), "quantizer_lr",
             "give a finite number >= 0 (0: the quantizers stay frozen)")
        for name in ("weight_decay", "teacher_weight", "hr_weight", "grad_clip"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and value >= 0 and math.isfinite(value), name,
                 "give a finite number >= 0")
        need(self.hr_weight > 0 or self.teacher_weight > 0, "hr_weight",
             "give hr_weight > 0 or a teacher_weight > 0: with both 0 nothing is a target")
        need(isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1, "gamma",
             "give a factor in (0, 1]")
        need(self.schedule in SCHEDULES, "schedule", f"valid: {', '.join(SCHEDULES)}")
        need(bool(self.sets) and all(isinstance(s, str) and s for s in self.sets), "sets",
             "name at least one training set under <data>/train, e.g. T91,General100")
        need(all(callable(r) for r in self.regularizers), "regularizers",
             "give callables taking a StepContext and returning a scalar tensor")
        need(self.backward is None or callable(self.backward), "backward",
             "give None or a callable (ctx, parts, params) that sets the gradients")
        return self

    def to_dict(self) -> dict:
        """Plain numbers, strings and lists (stored in checkpoints; regularizers by name)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sets"] = list(self.sets)
        out["regularizers"] = regularizer_names(self.regularizers)
        out["backward"] = regularizer_names([self.backward])[0] if self.backward else None
        return out

    @classmethod
    def from_dict(cls, values: dict, regularizers: list | None = None,
                  backward: Callable[..., Any] | None = None) -> "QATConfig":
        hooks = {"regularizers", "backward"}
        known = {f.name for f in fields(cls)} - hooks
        unknown = sorted(set(values) - known - hooks)
        if unknown:
            raise TrainError(f"unknown training settings {unknown}; valid: {sorted(known)}")
        kept = {k: v for k, v in values.items() if k in known}
        if "sets" in kept:
            kept["sets"] = tuple(kept["sets"])
        return cls(**kept, regularizers=list(regularizers or []), backward=backward).validate()


def regularizer_names(regularizers: list) -> list[str]:
    return [str(getattr(r, "name", None) or getattr(r, "__name__", None) or type(r).__name__)
            for r in regularizers]
