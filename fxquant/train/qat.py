"""Quantization-aware training (QAT) of a compiled model from its PTQ start (``fxquant train``).

The graph ``fxquant.compile`` returned trains as it is: the float weights **and** the
quantizers' static parameters (``Quantizer.trainable_parameters()``: uniform steps LSQ-style,
non-uniform levels) take Adam steps together, gradients passing the rounding by the
quantizers' straight-through estimator. Each step::

    lr, hr   = sampler.sample(batch, generator)      # random LR/HR patches, flips/rotations
    y        = gm(lr)                                # fake-quant forward, in [0, 1]
    recon    = hr_weight·|y − hr|₁  (+ teacher_weight·|y − float_model(lr)|₁)
    loss     = recon + Σ regularizer(ctx)            # the hook below
    loss.backward(); adam.step(); scheduler.step()   # steps kept positive afterwards

**Hooks** (ODM's v1/v2 terms and the like; details in :mod:`fxquant.train.hooks`):
``config.regularizers`` are callables ``r(ctx) -> scalar tensor`` added to the loss, ``ctx``
a :class:`StepContext` (``model``: the graph being trained, ``lr``/``hr``: this rank's
batch, ``output``, ``teacher_output`` (None unless ``teacher_weight``), ``teacher_model``,
``recon_loss`` (still in the autograd graph), ``step``, ``config``, ``params``,
``average()``). ``config.backward``, when set, replaces ``loss.backward()``: it gets
``(ctx, parts, params)`` and sets every ``p.grad`` itself (ODM's cooperative gradients);
under DDP the trainer then averages the gradients over the ranks.

The graph runs in eval mode throughout: BatchNorm uses its running statistics (which stay
fixed) and no quantizer updates a buffer in fake-quant mode (only ``observe`` mode records
ranges), so there are no statistics to synchronise between ranks (tests check the buffers
are identical). The float model is never touched: its copy (the teacher) is frozen, in eval
mode, run under ``no_grad``. ``gm`` itself is trained in place.

Exact resume (:mod:`fxquant.train.resume`): :meth:`QATTrainer.checkpoint` holds the graph's
state dict, Adam, the LR scheduler, the sampling generator's state (the whole data position),
torch's global RNG, the step and the metrics; :meth:`QATTrainer.from_checkpoint` rebuilds the
graph from the file and continues bit-identically (same thread count). Under ``torchrun``
(DDP, see :mod:`fxquant.train.distributed`) each rank takes a disjoint slice of every global
batch; rank 0 logs, evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn
from tqdm import tqdm

from fxquant.files import atomic_write_text, check_output_dir
from fxquant.heap import keep_freed_blocks
from fxquant.quant import Quantizer, UniformQuantizer
from fxquant.quant.nonuniform import NonUniformQuantizer
from fxquant.train.checkpoint import compiled_info
from fxquant.train.config import QATConfig, TrainError, regularizer_names
from fxquant.train.data import PatchSampler
from fxquant.train.distributed import World, setup
from fxquant.train.hooks import StepContext, average_gradients, make_trainable
from fxquant.train.methods import deployable, method_hooks
from fxquant.train.resume import Resumable

__all__ = ["QATConfig", "QATTrainer", "StepContext", "TrainError", "train"]


def refuse_folded_inputs(gm: fx.GraphModule) -> None:
    """Refuse a model whose per-channel activation steps are folded into conv weights
    (``fold-input-scales``): those weights are ``s_c·W``, about 1/255 of their float size,
    so every Adam step of ``lr`` moves them some 200× further relative to their size than in
    the unfolded model (FSRCNN ×2 ``minmax-w8a8-perchannel`` + reconstruction lost 2.3 dB on
    Set5 in 500 steps at the default ``lr``). Folding after training is no way round: the
    fold re-fits the weight quantizers to the scaled weights (FSRCNN ×2, the same start
    trained 2000 steps unfolded: −0.131 dB, folded afterwards: −0.802)."""
    folded = [name for name, m in gm.named_modules()
              if isinstance(m, UniformQuantizer) and getattr(m, "folded", False)]
    if folded:
        raise TrainError(
            f"{len(folded)} activation quantizer(s) ({', '.join(folded[:3])}"
            f"{', ...' if len(folded) > 3 else ''}) have their per-channel steps folded into "
            "the conv weights they feed (the fold-input-scales pass): those weights are "
            "then about 1/255 of their size and an Adam step of --lr wrecks them. Train the "
            "model compiled without fold-input-scales (the same recipe with that pass taken "
            "out of its pipeline); folding it afterwards re-fits its weight quantizers and "
            "loses what training learned")


def _scheduler(optimizer: torch.optim.Optimizer, config: QATConfig):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.StepLR(optimizer, config.steps, 1.0)


def _runner(model: nn.Module, spec: Any, scale: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] in and out whatever the model's range; a multi-scale float net gets ``scale``."""
    if spec is None:
        return model
    from fxquant.workflow import as_sr_function

    return as_sr_function(model, spec, scale)


class QATTrainer(Resumable):
    """Trains ``gm`` (a compiled model) in place; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, float_model: nn.Module, config: QATConfig, *,
                 sampler: PatchSampler, scale: int, spec: Any = None,
                 out_dir: str | os.PathLike | None = None,
                 evaluate: Callable[[fx.GraphModule], dict] | None = None,
                 data_root: str | os.PathLike | None = None, progress: bool = False,
                 world: World | None = None, model_info: dict | None = None):
        if not isinstance(gm, fx.GraphModule) or not hasattr(gm, "fxquant_recipe"):
            raise TrainError("train takes a compiled model (the GraphModule fxquant.compile "
                             f"or fxquant.load returns), got {type(gm).__name__}")
        refuse_folded_inputs(gm)
        floats = {id(p) for p in float_model.parameters()}
        if gm is float_model or any(id(p) in floats for p in gm.parameters()):
            raise TrainError("the compiled model shares parameters with the float model; "
                             "compile a copy (fxquant.compile copies the network it is given)")
        if not config.regularizers and config.backward is None:
            regularizers, backward = method_hooks(gm)
            if regularizers or backward is not None:
                config = dataclasses.replace(config, regularizers=regularizers, backward=backward)
        self.config = config.validate()
        self.world = world or World()
        self.gm, self.sampler, self.scale, self.spec = gm, sampler, scale, spec
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None and self.world.is_main:
            check_output_dir(self.out_dir, "training output folder (--out)")
            self.out_dir.mkdir(exist_ok=True)
        self.progress, self.data_root = progress, data_root
        self.info = compiled_info(gm, **(model_info or {}))
        self.evaluate = evaluate if evaluate is not None else \
            (self._evaluate_set if config.eval_every and spec is not None else None)
        self.gm.eval().to(self.world.device)
        self.teacher = copy.deepcopy(float_model).eval().requires_grad_(False).to(self.world.device)
        weights, quant = make_trainable(gm)
        if not config.quantizer_lr:  # the quantizers stay as the PTQ start left them
            for p in quant:
                p.requires_grad_(False)
            quant = []
        groups = [g for g in ({"params": weights, "lr": config.lr},
                              {"params": quant, "lr": config.lr * config.quantizer_lr})
                  if g["params"]]
        if not groups:
            raise TrainError("the compiled model has no parameters to train")
        self.params = [p for g in groups for p in g["params"]]
        self.quantizers = [m for m in gm.modules() if isinstance(m, Quantizer)]
        self.optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = _scheduler(self.optimizer, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.metrics, self.best_psnr = 0, [], -math.inf
        self.net: nn.Module = gm
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.world.device] if self.world.device.type == "cuda" else None
            with warnings.catch_warnings():  # newer torch: "use forward_sync_buffers"
                warnings.filterwarnings("ignore", ".*broadcast_buffers", FutureWarning)
                # no buffer changes while training (module docstring): nothing to broadcast
                self.net = DistributedDataParallel(gm, device_ids=ids, broadcast_buffers=False)
        self.student = _runner(self.net, spec, scale)
        self.teacher_fn = _runner(self.teacher, spec, scale)
        self.tensorboard = None

    # ---- training ----------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        config = self.config
        lo, hi = self.world.shard(config.batch_size)
        lr, hr = self.sampler.sample(config.batch_size, self.generator, lo, hi)
        lr, hr = lr.to(self.world.device), hr.to(self.world.device)
        if config.channels_last:
            lr = lr.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        custom = config.backward is not None
        with torch.enable_grad(), (self.net.no_sync() if custom and self.world.distributed
                                   else contextlib.nullcontext()):
            output = self.student(lr)
            parts = {}
            if config.hr_weight:
                parts["recon"] = config.hr_weight * (output - hr).abs().mean()
            teacher_output = None
            if config.teacher_weight:
                with torch.no_grad():
                    teacher_output = self.teacher_fn(lr)
                parts["teacher"] = config.teacher_weight * (output - teacher_output).abs().mean()
            recon = sum(parts.values())  # the reconstruction terms, before any regularizer
            ctx = StepContext(self.gm, lr, hr, output, teacher_output, self.teacher, recon,
                              self.step, config, self.world.size, self.params)
            for name, reg in zip(regularizer_names(config.regularizers), config.regularizers):
                parts[name] = reg(ctx)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise TrainError(f"the loss became {float(loss.detach())} at step {self.step} "
                                 f"({', '.join(f'{k}={float(v.detach()):.4g}' for k, v in parts.items())}); "
                                 f"lower --lr (now {config.lr})")
            logged = {}
            if custom:
                logged = config.backward(ctx, parts, self.params) or {}
                average_gradients(self.params, self.world.size)
            else:
                loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        for q in self.quantizers:  # steps stay positive (clipping bounds ordered)
            q.constrain()
        self.step += 1
        return {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                # on the loss's device: all are stacked into one tensor for the log
                **{k: torch.as_tensor(float(v), device=loss.device) for k, v in logged.items()}}

    def _mean_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        stacked = torch.stack([v.float().reshape(()) for v in values.values()])
        if self.world.distributed:
            torch.distributed.all_reduce(stacked)
            stacked /= self.world.size
        return {k: float(v) for k, v in zip(values, stacked.cpu())}

    def run(self, until: int | None = None) -> fx.GraphModule:
        """Train to ``config.steps`` (or pause after step ``until``: call again, or save a
        checkpoint and resume). At the end the final checkpoint, ``model.fxq`` and the
        metrics are written (rank 0, with an output folder); returns the graph."""
        config, main = self.config, self.world.is_main
        end = config.steps if until is None else min(until, config.steps)
        keep_freed_blocks()  # each step's large blocks are reused instead of faulted in anew
        self._open_tensorboard()
        bar = tqdm(total=config.steps, initial=self.step, desc="train", leave=False,
                   disable=not (self.progress and main))
        started = time.perf_counter()
        if self.step == 0 and not self.metrics and self.evaluate is not None and config.eval_every:
            self._run_evaluation()  # the PTQ start, to compare with
        while self.step < end:
            values = self.train_step()
            bar.update(1)
            last = self.step == config.steps
            if self.step % config.log_every == 0 or last:
                row = {"step": self.step, **self._mean_over_ranks(values),
                       "lr": self.optimizer.param_groups[0]["lr"],
                       "seconds": round(time.perf_counter() - started, 3)}
                bar.set_postfix(loss=f"{row['loss']:.4g}")
                self._record(row)
            if self.evaluate is not None and config.eval_every and \
                    (self.step % config.eval_every == 0 or last):
                self._run_evaluation()
            if config.checkpoint_every and self.step % config.checkpoint_every == 0 and not last:
                self._write_checkpoint()
        bar.close()
        if self.step >= config.steps:
            self._write_checkpoint()
            self.finish()
            if main and self.out_dir is not None:
                import fxquant

                info = self.info["model"]
                fxquant.save(deployable(self.gm), self.out_dir / "model.fxq", model_name=info.get("name"),
                             scale=info.get("scale"), user_model=info.get("user"))
        if self.tensorboard is not None:
            self.tensorboard.flush()
        return self.gm

    def release(self) -> None:
        """Drop the DDP wrapper (its reducer holds the process group): call before the
        process group is destroyed, or a rank can hang freeing it afterwards."""
        if self.net is not self.gm:
            self.net = self.gm
            self.student = _runner(self.gm, self.spec, self.scale)
            gc.collect()

    def finish(self) -> None:
        """The result static again: quantizer parameters frozen, non-uniform levels sorted
        and back on their grid (as after the ``reconstruct`` pass)."""
        for module in self.gm.modules():
            if isinstance(module, Quantizer):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
            if isinstance(module, NonUniformQuantizer):
                module.tidy()

    # ---- evaluation, logs and files (rank 0) -------------------------------------------
    def _as_saved(self) -> fx.GraphModule:
        """The model as it would be saved now, for evaluation and ``best.fxq``: a copy with
        non-uniform levels tidied back onto their grid (:meth:`finish`) and offsets folded.
        Trained levels drift off their grid; scoring the training graph itself reported a
        PSNR the saved model did not have (I²NQ QAT on IMDN: 0.04 dB above it)."""
        from fxquant.compiler import compiled_copy

        model = compiled_copy(self.gm)
        for module in model.modules():
            if isinstance(module, NonUniformQuantizer):
                module.tidy()
        return deployable(model)

    def _evaluate_set(self, gm: fx.GraphModule) -> dict:
        from fxquant.workflow import evaluate_sets

        run, device = _runner(gm, self.spec, self.scale), self.world.device
        score = evaluate_sets(lambda x: run(x.to(device)).cpu(), self.spec, self.scale,
                              [self.config.eval_set], data_root=self.data_root,
                              limit=self.config.eval_limit)[self.config.eval_set]
        return {"psnr": float(score.psnr), "ssim": float(score.ssim)}

    def _run_evaluation(self) -> None:
        if not self.world.is_main:
            return
        model = self._as_saved()
        with torch.no_grad():
            scores = self.evaluate(model)
        row = {"step": self.step, "eval_set": self.config.eval_set,
               **{k: float(v) for k, v in scores.items()}}
        self._record(row)
        psnr = row.get("psnr")
        if psnr is not None and psnr > self.best_psnr:
            self.best_psnr = psnr
            if self.out_dir is not None:
                import fxquant

                info = self.info["model"]
                fxquant.save(model, self.out_dir / "best.fxq", model_name=info.get("name"),
                             scale=info.get("scale"), user_model=info.get("user"))

    def _record(self, row: dict) -> None:
        if not self.world.is_main:
            return
        self.metrics.append(row)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])
        if self.out_dir is not None:  # the whole log, replaced atomically
            atomic_write_text(self.out_dir / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in self.metrics),
                              "training metrics")

    def _write_checkpoint(self) -> None:
        if self.world.is_main and self.out_dir is not None:
            self.save_checkpoint(self.out_dir / "last.ckpt")

    def _open_tensorboard(self) -> None:
        if self.tensorboard is not None or self.out_dir is None or not self.world.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.tensorboard = SummaryWriter(str(self.out_dir / "tensorboard"))


def train(gm: fx.GraphModule, float_model: nn.Module, config: QATConfig, *, scale: int,
          sampler: PatchSampler | None = None, spec: Any = None,
          data_root: str | os.PathLike | None = None, **kwargs) -> fx.GraphModule:
    """Train compiled ``gm`` in place from its PTQ start and return it. Without ``sampler``
    the patches come from ``config.sets`` under ``data_root`` (``$FXQUANT_DATA``); ``kwargs``:
    ``out_dir``, ``evaluate``, ``progress``, ``world``, ``model_info`` (see QATTrainer)."""
    world = kwargs.pop("world", None) or setup()
    if sampler is None:
        sampler = PatchSampler.from_sets(config.sets, scale, config.patch, root=data_root,
                                         color=getattr(spec, "color", "rgb"),
                                         augment=config.augment)
    return QATTrainer(gm, float_model, config, sampler=sampler, scale=scale, spec=spec,
                      data_root=data_root, world=world, **kwargs).run()
