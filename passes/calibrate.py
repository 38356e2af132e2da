"""``calibrate``: run calibration batches through the graph so observers see data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx
from tqdm import tqdm

from fxquant.calibration import as_batches
from fxquant.errors import CalibrationError, FxquantError, RecipeError
from fxquant.observers import Observer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class CalibratePass(Pass):
    """Run ``ctx.calib`` through the graph in eval mode, without gradients.

    The graph is not changed; observers (and any module with calibration state) record
    statistics. ``batches`` limits how many batches are used. Skipped when a compiled model
    is being rebuilt for loading (``ctx.calibrate`` false). When a later pass reuses them
    (``reconstruct``: the float model's outputs, its distillation targets), the graph's
    outputs are kept by batch index in ``ctx.state["calibration_outputs"]`` (in-memory
    batches only; streamed ones are not held). A batch the model cannot run
    (wrong channel count, wrong rank) is a ``CalibrationError`` naming the batch and its shape.
    """

    name: ClassVar[str] = "calibrate"
    batches: int | None = None

    def __post_init__(self):
        # a slice bound: 0 would calibrate nothing, -1 silently drop the last batch
        if self.batches is not None and self.batches < 1:
            raise RecipeError(f"calibrate.batches = {self.batches}: give a number of batches "
                              ">= 1, or leave it out to use them all")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        needs_data = any(isinstance(m, Observer) or getattr(m, "needs_calibration", False)
                         for m in gm.modules())
        if not ctx.calibrate or not needs_data:
            return PassResult(gm, False, {"batches": 0})
        batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)
        if self.batches is not None:
            batches = batches[: self.batches]
        keep = ctx.state.get("keep_calibration_outputs", False) and isinstance(batches, list)
        outputs: dict[int, object] = {}
        was_training = gm.training
        gm.eval()
        with torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibrate",
                                               disable=not ctx.progress, leave=False)):
                try:
                    out = gm(*batch)
                    if keep:
                        outputs[index] = out
                except FxquantError:
                    raise
                except Exception as exc:  # wrong channels or rank: torch's message, with the batch
                    shapes = ", ".join(str(tuple(t.shape)) for t in batch
                                       if isinstance(t, torch.Tensor))
                    pair = (" (an (LR, HR) pair? calibration needs the LR input alone, e.g. "
                            "[lr for lr, hr in loader])" if len(batch) == 2 else "")
                    raise CalibrationError(
                        f"calibration batch {index} (shape {shapes}) does not run through the "
                        f"model: {type(exc).__name__}: {exc}; give batches the float model "
                        f"accepts as input{pair}") from exc
        gm.train(was_training)
        if keep:
            ctx.state["calibration_outputs"] = outputs
        return PassResult(gm, False, {"batches": len(batches),
                                      "samples": sum(b[0].shape[0] for b in batches)})
