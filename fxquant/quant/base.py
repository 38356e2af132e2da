"""The contract every quantizer implements, so that passes, tools and lowering treat all of
them alike.

A :class:`Quantizer` has

- ``fake_quant(x)``: the de-quantized value of ``x`` (what the float graph computes);
- ``integer_codes(x)``: the same value as integers plus what maps them back
  (:class:`AffineCodes` for uniform and DAQ, :class:`CodebookCodes` for subset/non-uniform
  level sets); ``integer_codes(x).dequantize()`` equals ``fake_quant(x)`` up to float rounding;
- ``describe()`` (graph dumps, ``fxquant inspect``) and ``check()`` (run by the pass manager
  after every pass);
- ``trainable_parameters()``: its static parameters made trainable (reconstruction, QAT),
  and ``constrain()``, run after every optimizer step, which keeps them valid (steps > 0);
- **one mode switch**, ``quant_mode``: ``fake-quant`` (default), ``observe`` (identity, and
  the running min/max of the input is recorded in ``observed_range``) or ``off`` (identity).
  :func:`set_quant_mode` / :func:`quant_mode` switch every quantizer of a model; every tool
  uses them instead of swapping modules or patching ``forward``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

QUANT_MODES = ("fake-quant", "observe", "off")


@dataclass
class AffineCodes:
    """``x̂ = (codes − zero_point)·scale + offset``, every parameter broadcastable to ``codes``.

    Static uniform: per-tensor/channel ``scale``, integer ``zero_point``, no offset. Dynamic
    (DAQ): per-(image, channel) ``scale`` and ``offset`` (the channel mean), mid-rise
    ``zero_point = 0.5``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | float = 0
    offset: torch.Tensor | None = None
    qmin: int | None = None
    qmax: int | None = None

    def dequantize(self) -> torch.Tensor:
        x = (self.codes.to(self.scale.dtype) - self.zero_point) * self.scale
        return x if self.offset is None else x + self.offset


@dataclass
class CodebookCodes:
    """``x̂ = denormalize(levels[c, codes])``: per-channel level tables (``C × K``) indexed by
    integer codes; ``scale``/``offset`` undo the channel normalization (``x̂ = l·scale + offset``)."""

    codes: torch.Tensor
    levels: torch.Tensor
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        n, c = self.codes.shape[:2]
        table = self.levels.unsqueeze(0).expand(n, c, self.levels.shape[-1])
        x = torch.gather(table, 2, self.codes.reshape(n, c, -1).long()).reshape(self.codes.shape)
        if self.scale is not None:
            x = x * self.scale
        return x if self.offset is None else x + self.offset


class Quantizer(nn.Module):
    """Base class of every quantizer module (see the module docstring for the contract)."""

    kind = "quantizer"

    def __init__(self):
        super().__init__()
        self.quant_mode = "fake-quant"
        self.observed_range: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_mode == "fake-quant":
            return self.fake_quant(x)
        if self.quant_mode == "observe":
            self.observe(x)
        return self.passthrough(x)

    def passthrough(self, x: torch.Tensor) -> torch.Tensor:
        """What the quantizer outputs when it does not quantize (observe and off modes, QDrop):
        ``x`` itself, in the units its consumers expect."""
        return x

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def integer_codes(self, x: torch.Tensor) -> AffineCodes | CodebookCodes:  # pragma: no cover
        raise NotImplementedError

    def observe(self, x: torch.Tensor) -> None:
        """Record the running min/max of ``x`` (observe mode)."""
        lo, hi = torch.aminmax(x.detach().float())
        if self.observed_range is not None:
            lo, hi = torch.minimum(lo, self.observed_range[0]), torch.maximum(hi, self.observed_range[1])
        self.observed_range = (lo, hi)

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Make the quantizer's static parameters (ranges, levels) trainable and return them,
        for reconstruction and QAT; a quantizer with none to offer returns []."""
        return []

    def constrain(self) -> None:
        """After an optimizer step: bring trained parameters back into their valid range
        (steps positive, so clipping bounds stay ordered). Nothing to do by default."""

    def check(self) -> None:
        """Subclasses override; the base quantizer has nothing to check."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")


def buffer_as_parameter(module: nn.Module, name: str) -> nn.Parameter:
    """Turn buffer ``name`` of ``module`` into a trainable Parameter under the same
    state_dict key (a no-op when it already is one); return it."""
    value = getattr(module, name)
    if not isinstance(value, nn.Parameter):
        data = value.detach().clone()
        del module._buffers[name]
        setattr(module, name, nn.Parameter(data))
    param = getattr(module, name)
    param.requires_grad_(True)
    return param


# Learned step multipliers (DAQ, DFSQ) stay above this: a step of 0 would collapse a channel.
MIN_MULTIPLIER = 1e-3


def ones_if_missing(name: str, shape) -> Callable:
    """A load_state_dict pre-hook that fills in buffer ``name`` with ones when the state dict
    predates it (a model saved before step multipliers existed)."""
    def hook(module, state_dict, prefix, *args):
        state_dict.setdefault(prefix + name, torch.ones(shape))
    return hook


def multiplier_summary(multiplier: torch.Tensor) -> str | None:
    """``"0.81-1.24"`` for learned step multipliers, None while they are all 1."""
    values = multiplier.detach()
    if bool((values == 1).all()):
        return None
    return f"{float(values.min()):.3g}-{float(values.max()):.3g}"


def check_multiplier(multiplier: torch.Tensor, what: str) -> None:
    if not torch.isfinite(multiplier).all() or (multiplier <= 0).any():
        raise ValueError(f"{what}: step multipliers must be finite and > 0")


class StepMultiplierMixin:
    """For quantizers whose steps come from statistics (DAQ, DFSQ): a ``step_multiplier``
    buffer of ``shape`` (1 = the method's own quantizer) that reconstruction and QAT train
    (``trainable_parameters``) and keep positive (``constrain``)."""

    def init_step_multiplier(self, shape) -> None:
        self.register_buffer("step_multiplier", torch.ones(shape))
        self.register_load_state_dict_pre_hook(ones_if_missing("step_multiplier", shape))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [buffer_as_parameter(self, "step_multiplier")]

    def constrain(self) -> None:
        with torch.no_grad():
            self.step_multiplier.clamp_(min=MIN_MULTIPLIER)

    def with_multiplier(self, info: dict) -> dict:
        """``describe()``'s dict, plus the learned multipliers' range once they are not 1."""
        learned = multiplier_summary(self.step_multiplier)
        return {**info, "step_multiplier": learned} if learned else info


def _check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"quantizer mode '{mode}' unknown; valid: {', '.join(QUANT_MODES)}")


def set_quant_mode(model: nn.Module, mode: str, keep: Iterable[str] = ()) -> dict[str, str]:
    """Put every quantizer of ``model`` except those named in ``keep`` (qualified names) in
    ``mode``; return the previous mode of each one changed."""
    _check_mode(mode)
    keep = set(keep)
    previous = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name not in keep:
            previous[name] = module.quant_mode
            module.quant_mode = mode
    return previous


@contextlib.contextmanager
def quant_mode(model: nn.Module, mode: str, keep: Iterable[str] = ()) -> Iterator[list[str]]:
    """Within the block every quantizer of ``model`` but ``keep`` is in ``mode``; yields the
    names switched, and restores each one's previous mode on exit."""
    previous = set_quant_mode(model, mode, keep)
    try:
        yield list(previous)
    finally:
        for name, old in previous.items():
            model.get_submodule(name).quant_mode = old
