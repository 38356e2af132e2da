"""Block-wise reconstruction (BRECQ, Li et al., ICLR 2021): train each block's quantizer
parameters in turn, in graph order, to reproduce the float model's values at the block's
outputs from the inputs the quantized model gives it.

For block ``b`` the quantized graph is run once per calibration batch up to ``b``'s inputs
(the blocks before it already reconstructed: ``b`` learns to correct the error it is
handed), and the float graph once up to ``b``'s outputs; both are held for every batch (one
block's worth: streamed calibration data is read once per block), so each step runs the block
alone, forward and backward. The loss is the summed mean squared error over the
block's outputs. Parameters of modules an earlier block already trained (a module called in
two blocks) stay as that block left them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.blocks import Block, block_graph, partition
from fxquant.graph import values_of
from fxquant.train.engine import TrainConfig, Trainer, to_layout


@dataclass
class BlockResult:
    name: str
    parameters: int
    steps: int
    best_step: int
    loss_before: float
    loss_after: float


def reconstruct_blocks(gm: fx.GraphModule, teacher: fx.GraphModule, groups: list[dict],
                       train: Sequence[tuple], heldout: Sequence[tuple], config: TrainConfig, *,
                       progress: bool = False,
                       after_step: Callable[[], None] | None = None,
                       layout: torch.memory_format = torch.contiguous_format) -> list[BlockResult]:
    """Train ``groups`` (dicts with ``params``, ``lr_scale`` and ``module``, the path of the
    module that owns them) block by block, on block inputs held in ``layout``; every parameter
    ends with ``requires_grad`` False. Returns one result per block that had something to
    train."""
    results, done = [], set()
    for p in (p for g in groups for p in g["params"]):
        p.requires_grad_(False)
    for block in partition(gm, teacher):
        modules = {str(n.target) for n in block.nodes if n.op == "call_module"} - done
        done |= modules
        block_groups = [g for g in groups if g["module"] in modules]
        if not block_groups:
            continue
        results.append(_train_block(gm, teacher, block, block_groups, train, heldout, config,
                                    progress, after_step, layout))
    return results


def _train_block(gm, teacher, block: Block, groups, train, heldout, config, progress,
                 after_step, layout) -> BlockResult:
    student_inputs = values_of(gm, [n.name for n in block.inputs])
    teacher_outputs = values_of(teacher, block.targets)
    with torch.no_grad():  # QDrop's hooks act only with gradients on: plain inputs here
        train, heldout = ([(to_layout(student_inputs(*to_layout(b, layout)), layout),
                            teacher_outputs(*b))
                           for b in batches]
                          for batches in (train, heldout))
    block_gm = block_graph(gm, block)

    def loss_fn(item):
        inputs, targets = item
        outputs = block_gm(*inputs)
        return sum(F.mse_loss(out, target) for out, target in zip(outputs, targets))

    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    try:
        result = Trainer(groups, loss_fn, train, heldout, config, progress=progress,
                         desc=f"reconstruct {block.name}", after_step=after_step).run()
    finally:
        for p in params:
            p.requires_grad_(False)
    return BlockResult(block.name, sum(p.numel() for p in params), result.steps,
                       result.best_step, round(result.first_heldout, 8),
                       round(result.best_heldout, 8))
