"""What a QAT step hands to plug-ins (ODM's regularizers and the like).

Two hooks, both in :class:`~fxquant.train.config.QATConfig`:

- ``regularizers``: callables ``r(ctx) -> scalar tensor``. Each one's value is logged under
  its ``name`` and added to the loss: ``loss = recon (+ teacher) + Σ r(ctx)``
  (``recon`` left out when ``hr_weight = 0``).
- ``backward``: ``None`` (``loss.backward()``), or a callable
  ``b(ctx, parts, params) -> dict | None`` that sets ``p.grad`` of every parameter in
  ``params`` itself from the loss terms ``parts`` (``{"recon": ..., "teacher": ...,
  <regularizer name>: ...}``, all still in the autograd graph): e.g. ODM's cooperative
  combination of the reconstruction and regularizer gradients. What it returns (numbers)
  is logged. Under DDP the forward then runs without DDP's gradient hooks and the trainer
  averages every ``p.grad`` over the ranks after the hook; a hook that must combine
  *global* gradients averages them first with ``ctx.average(tensors)`` (averaging equal
  tensors again changes nothing).

Optional attributes of a regularizer or backward hook: ``name`` (logged; a resumed run must
pass the same ones again) and ``state_dict()``/``load_state_dict()`` (saved in checkpoints).
Parameters a plug-in needs trained belong in the graph (a pass such as ``inject-offsets``):
every parameter of the graph trains, and DDP synchronises only those.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from fxquant.quant import Quantizer


@dataclass
class StepContext:
    """One training step, as the hooks see it (``lr``/``hr``: this rank's slice)."""

    model: fx.GraphModule
    lr: torch.Tensor
    hr: torch.Tensor
    output: torch.Tensor
    teacher_output: torch.Tensor | None
    teacher_model: nn.Module
    recon_loss: torch.Tensor
    step: int
    config: Any
    world_size: int = 1
    params: list[nn.Parameter] = field(default_factory=list)

    def average(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The mean of each tensor over the ranks (the tensors themselves on one process)."""
        if self.world_size <= 1:
            return list(tensors)
        out = []
        for t in tensors:
            t = t.detach().clone()
            dist.all_reduce(t)
            out.append(t / self.world_size)
        return out


def make_trainable(gm: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Every parameter of ``gm`` trainable, quantizers' static parameters made Parameters
    (``Quantizer.trainable_parameters``); returns (weights, quantizer parameters), each in
    ``named_parameters`` order (the same order on a graph rebuilt from a checkpoint)."""
    quant = {id(p) for m in gm.modules() if isinstance(m, Quantizer)
             for p in m.trainable_parameters()}
    params = list(gm.parameters())
    for p in params:
        p.requires_grad_(True)
    return [p for p in params if id(p) not in quant], [p for p in params if id(p) in quant]


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """``p.grad`` averaged over the ranks (what DDP does), after a custom backward."""
    if world_size <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world_size

