"""``reconstruct``: train the static parameters of the quantizers a pipeline inserted (and the
weights' rounding) by distillation from the float model on the calibration data."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.calibration import as_batches
from fxquant.errors import PassError
from fxquant.graph import nothing_selected, with_outputs
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, Quantizer, UniformQuantizer
from fxquant.quant import rounding
from fxquant.quant.nonuniform import NonUniformQuantizer
from fxquant.recipe import RecipeError
from fxquant.train import TrainConfig, Trainer
from fxquant.train.blockwise import reconstruct_blocks
from fxquant.train.engine import to_layout

EPS = 1e-12
GRANULARITIES = ("model", "block")  # one loss at the output, or BRECQ's block by block
LOSSES = ("l1", "mse")  # the output loss: L1 (2DQuant, OAQ) or squared error (what PSNR measures)


def feature_loss(student: tuple, teacher: tuple) -> torch.Tensor:
    """Mean over features of ‖f_q/‖f_q‖ − f/‖f‖‖² per image (2DQuant's normalized feature
    loss): scale-free, so every feature counts alike whatever its magnitude, and bounded by 4,
    so a feature that is all zeros for an image (a ReLU branch) cannot blow the loss up."""
    losses = []
    for s, t in zip(student, teacher):
        s, t = F.normalize(s.flatten(1), dim=1), F.normalize(t.flatten(1), dim=1)
        losses.append((s - t).pow(2).sum(1).mean())
    return torch.stack(losses).mean()


@register_pass
@dataclass(frozen=True)
class ReconstructPass(Pass):
    """Distillation of the quantized graph towards the float graph (its copy from ``trace``).

    The graph keeps its structure; trained are the quantizers' static parameters
    (``ranges``: uniform steps, LSQ-style; non-uniform levels; DAQ's per-channel step
    multipliers) and the weights' rounding
    (``rounding``: an offset of ±1 step per weight, baked into the weights at the end). The
    float weights are frozen. Loss: L1 between the outputs (``loss = "mse"``: their mean
    squared error, the quantity PSNR measures), plus (``feature_weight`` > 0;
    0 by default: on IMDN ×4 it cost 0.43 dB uniform and 0.18 dB I²NQ) ``feature_weight`` × the
    normalized squared error of every quantized tensor's float source::

        x ──► q1 ──► c1 ──► ... ──► y_q          L = |y_q − y| + λ·mean_f ‖f_q/‖f_q‖ − f/‖f‖‖²
        x ──► (float copy)      ──► y

    Adam with cosine decay, ``lr`` relative to each parameter's magnitude; the last
    ``heldout`` fraction of calibration batches picks the best step and stops early.
    ``drop`` > 0 is QDrop: during training each activation element skips its quantizer with
    that probability (the paper's 0.5), which flattens what the steps are fitted to.
    ``granularity = "block"`` is BRECQ's block-wise reconstruction (:mod:`fxquant.train.blockwise`,
    blocks from :mod:`fxquant.blocks`): each block in turn, ``steps`` steps each, on the
    summed squared error of its outputs, from the inputs the quantized blocks before it give::

        x ─► [block 1] ─► [block 2] ─► ...     block k: L = Σ_o ‖o_q − o‖²/n, inputs from the
                                                 quantized graph, targets from the float one

    ``channels_last`` trains on channels-last inputs (convs, quantizers and elementwise ops
    keep the layout): on this CPU a training step of PAN ×4 ``i2nq-w4a4`` runs 1.6× as fast,
    CARN-M's between 0.9× and 1.35× over three runs, IMDN's (whose splits slice channels) as
    fast as NCHW (``tools/train_layout.py``, docs/performance.md). Float results differ in
    rounding from NCHW, so it is off by default and the presets that use it say so.

    Without the feature loss, the float model's output for each calibration batch is
    computed once; ``calibrate`` already computed it for the same batches, so those are
    taken once the first one equals the float model's bit for bit.

    Skipped when a saved model is rebuilt for loading (its state dict holds the result).
    """

    name: ClassVar[str] = "reconstruct"
    reads_calibration_outputs: ClassVar[bool] = True
    steps: int = 500
    lr: float = 1e-3
    rounding_lr: float = 1e-2
    feature_weight: float = 0.0
    loss: str = "l1"
    ranges: bool = True
    rounding: bool = True
    heldout: float = 0.125
    drop: float = 0.0
    granularity: str = "model"
    eval_every: int = 50
    patience: int = 4
    seed: int = 0
    channels_last: bool = False

    def __post_init__(self):
        TrainConfig(self.steps, self.lr, self.seed, self.eval_every, self.patience).validate(self.name)
        if not self.rounding_lr > 0:
            raise RecipeError(f"reconstruct.rounding_lr = {self.rounding_lr} must be > 0")
        if not self.feature_weight >= 0:
            raise RecipeError(f"reconstruct.feature_weight = {self.feature_weight} must be >= 0")
        if not 0 <= self.heldout < 1:
            raise RecipeError(f"reconstruct.heldout = {self.heldout} must lie in [0, 1)")
        if self.granularity not in GRANULARITIES:
            raise RecipeError(f"reconstruct.granularity = {self.granularity!r}: use "
                              + " or ".join(repr(g) for g in GRANULARITIES))
        if self.loss not in LOSSES:
            raise RecipeError(f"reconstruct.loss = {self.loss!r}: use "
                              + " or ".join(repr(name) for name in LOSSES))
        if self.loss != "l1" and self.granularity == "block":
            raise RecipeError("reconstruct.loss applies to granularity = 'model'; block-wise "
                              "reconstruction always uses the squared error of each block")
        if not 0 <= self.drop < 1:
            raise RecipeError(f"reconstruct.drop = {self.drop} must lie in [0, 1) (QDrop's "
                              "probability of passing an activation through unquantized)")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not ctx.calibrate or nothing_selected(ctx.state):
            return PassResult(gm, False, {"steps": 0})
        teacher = ctx.state.get("float_model")
        if teacher is None:
            raise PassError(self.name, "no float model to distil from: the pipeline must start "
                            "with 'trace'")
        groups, offsets = self._trainable(gm)
        names = self._features(gm, teacher)
        student_f, teacher_f = with_outputs(gm, names), with_outputs(teacher, names)

        batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # the float model and in-memory calibration batches are fixed: without the feature
        # loss its outputs are computed once per batch (a forward per step saved; 28 MB for
        # 64 ×4 patches), with it every step (the features of every layer would not fit);
        # streamed batches (LazyBatches) are new tensors on every read: no cache
        targets: dict[int, tuple] = {}
        cache = isinstance(batches, list) and not (self.feature_weight and names)
        calibrated = ctx.state.pop("calibration_outputs", None) or {}
        if cache:
            with torch.no_grad():
                targets.update(_calibrated_targets(calibrated, batches, teacher_f))

        def teacher_outputs(batch):
            if not cache:
                return teacher_f(*batch)
            key = id(batch[0])  # the list keeps every batch alive: ids are not reused
            if key not in targets:
                targets[key] = (teacher_f(*batch)[0], None)
            return targets[key]

        def loss_fn(batch):
            with torch.no_grad():
                target, target_features = teacher_outputs(batch)
            out, features = student_f(*to_layout(batch, layout))
            diff = out - target
            loss = diff.abs().mean() if self.loss == "l1" else diff.square().mean()
            if self.feature_weight and names:
                loss = loss + self.feature_weight * feature_loss(features, target_features)
            return loss

        held = int(round(len(batches) * self.heldout)) if len(batches) > 1 else 0
        train, heldout = (batches[:-held], batches[-held:]) if held else (batches, batches[:1])
        trained = {id(p) for g in groups for p in g["params"]}
        frozen = {name: p.requires_grad for name, p in gm.named_parameters() if id(p) not in trained}
        for name, p in gm.named_parameters():
            if id(p) not in trained:
                p.requires_grad_(False)
        quantizers = [m for m in gm.modules() if isinstance(m, Quantizer)]
        handles = _qdrop(gm, self.drop, self.seed) if self.drop else []
        started = time.perf_counter()
        config = TrainConfig(self.steps, self.lr, self.seed, self.eval_every, self.patience)
        constrain = lambda: [q.constrain() for q in quantizers]  # noqa: E731
        try:
            if self.granularity == "block":
                with torch.no_grad():  # the end-to-end loss, which the blocks do not see
                    before = sum(float(loss_fn(b)) for b in heldout) / len(heldout)
                blocks = reconstruct_blocks(gm, teacher, groups, train, heldout, config,
                                            progress=ctx.progress, after_step=constrain,
                                            layout=layout)
                result = None
            else:
                blocks = []
                result = Trainer(groups, loss_fn, train, heldout, config, progress=ctx.progress,
                                 desc="reconstruct", after_step=constrain).run()
                before = result.first_heldout
        finally:
            for handle in handles:
                handle.remove()
            for conv in offsets:
                rounding.bake(conv)
            for name, p in gm.named_parameters():  # the result is static again
                p.requires_grad_(frozen.get(name, False))
        for module in gm.modules():
            if isinstance(module, NonUniformQuantizer):
                module.tidy()
        with torch.no_grad():
            final = sum(float(loss_fn(b)) for b in heldout) / len(heldout)
        info = {"granularity": self.granularity,
                "heldout_loss_before": round(before, 6), "heldout_loss_after": round(final, 6),
                "parameters": sum(p.numel() for g in groups for p in g["params"]),
                "features": len(names), "seconds": round(time.perf_counter() - started, 1)}
        if result is not None:
            info.update({"steps": result.steps, "best_step": result.best_step,
                         "stopped_early": result.stopped_early,
                         "history": [(s, round(t, 6), round(h, 6)) for s, t, h in result.history]})
        else:
            info.update({"steps": sum(b.steps for b in blocks),
                         "blocks": [asdict(b) for b in blocks]})
        return PassResult(gm, True, info)

    def _trainable(self, gm: fx.GraphModule) -> tuple[list[dict], list[QuantConv2d]]:
        groups, offsets, kinds = [], [], set()
        for name, module in gm.named_modules():
            if not isinstance(module, Quantizer):
                continue
            kinds.add(module.kind)
            if self.ranges:
                for p in module.trainable_parameters():
                    groups.append({"params": [p], "lr_scale": _magnitude(module, p),
                                   "module": name})
        if self.rounding:
            for name, module in gm.named_modules():
                if isinstance(module, QuantConv2d) and isinstance(module.weight_quantizer,
                                                                  UniformQuantizer):
                    groups.append({"params": [rounding.attach(module)],
                                   "lr_scale": self.rounding_lr / self.lr, "module": name})
                    offsets.append(module)
        if not groups:
            raise PassError(self.name, "nothing to train: the pipeline inserted no quantizer "
                            "with trainable parameters (found: "
                            f"{', '.join(sorted(kinds)) or 'no quantizers'}); reconstruct trains "
                            "uniform steps, non-uniform levels, DAQ step multipliers and uniform "
                            "weight rounding — put it after quantize, nonuniform-quant or daq")
        return groups, offsets

    @staticmethod
    def _features(gm: fx.GraphModule, teacher: fx.GraphModule) -> list[str]:
        """The float values the activation quantizers read, present in both graphs."""
        in_teacher = {n.name for n in teacher.graph.nodes}
        names = []
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), Quantizer):
                source = node.args[0]
                if isinstance(source, fx.Node) and source.name in in_teacher \
                        and source.name not in names and source.op != "placeholder":
                    names.append(source.name)
        return names


def _calibrated_targets(calibrated: dict, batches: list, teacher_f) -> dict[int, tuple]:
    """The distillation targets ``calibrate`` already computed, keyed like the pass's cache.

    ``calibrate`` ran the same batches through the observed graph, whose outputs are the float
    model's when its observers only watch (CARN-M ×4, 512 patches: 64 float forwards,
    ~19 s). The float model runs on the first kept batch; the kept outputs are taken when its
    output equals the kept one bit for bit, otherwise only that computed output is."""
    kept = {i: out for i, out in calibrated.items() if 0 <= i < len(batches)}
    if not kept:
        return {}
    first = min(kept)
    computed = teacher_f(*batches[first])[0]
    targets = {id(batches[first][0]): (computed, None)}
    if _equal(kept[first], computed):
        targets.update({id(batches[i][0]): (out, None) for i, out in kept.items() if i != first})
    return targets


def _equal(a, b) -> bool:
    """Outputs equal bit for bit (a tensor, or tuples/lists of them)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_equal(x, y) for x, y in zip(a, b))
    return False


def _qdrop(gm: fx.GraphModule, drop: float, seed: int) -> list:
    """QDrop (Wei et al., ICLR 2022): while training (gradients on), every activation
    quantizer in the graph passes each element of its input through unquantized with
    probability ``drop``; held-out evaluation and the result see plain quantization."""
    generator = torch.Generator().manual_seed(seed + 1)

    def hook(module, args, out):
        if not torch.is_grad_enabled() or module.quant_mode != "fake-quant":
            return out
        keep = (torch.rand(out.shape, generator=generator) < drop).to(out.device)
        if out.ndim == 4 and out.is_contiguous(memory_format=torch.channels_last):
            # same draws per element; without this, where() returns NCHW and every conv
            # after the quantizer converts back (docs/methods/reconstruct.md, QDrop on PAN)
            keep = keep.contiguous(memory_format=torch.channels_last)
        return torch.where(keep, module.passthrough(args[0]), out)

    return [gm.get_submodule(n.target).register_forward_hook(hook) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Quantizer)]


def _magnitude(module: Quantizer, p: torch.nn.Parameter) -> float:
    """Learning-rate scale of a parameter: a step's size (uniform scales: their mean; levels:
    the mean gap between them)."""
    values = p.detach()
    if isinstance(module, NonUniformQuantizer):
        return float(values.diff(dim=1).abs().mean().clamp(min=EPS))
    return float(values.abs().mean().clamp(min=EPS))
