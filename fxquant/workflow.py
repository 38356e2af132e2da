"""The zoo-model workflow shared by the CLI, the results table and reports:
build a pretrained network, draw calibration patches, compile, evaluate FP against quantized."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

import fxquant
from fxquant.data import BenchmarkSet, CalibrationPatches, calibration_patches
from fxquant.evaluate import SetScore, SRFunction, evaluate
from fxquant.models import ModelSpec
from fxquant.models.user import ModelSource, resolve_model
from fxquant.recipe import Recipe, RecipeLike, resolve_recipe


def as_sr_function(model: nn.Module, spec: ModelSpec, scale: int) -> SRFunction:
    """A callable on the LR tensor alone (multi-scale nets get their scale bound), taking and
    returning [0, 1] whatever the model's own range (``--range 255`` models: ×255 in, ÷255
    out, outside the traced graph; see :func:`with_range`)."""
    if spec.takes_scale and not isinstance(model, fx.GraphModule):
        return with_range(lambda x: model(x, scale), spec)
    return with_range(model, spec)


def with_range(fn: SRFunction, spec: ModelSpec) -> SRFunction:
    """``fn`` on [0, 1] tensors for a model that takes 0..``value_range``. The convention is
    applied here, around the model, not by a wrapper module inside it: the traced and
    compiled graph stays the user's network exactly (what they deploy on 0..255 data), its
    quantizers see the activations it really has, and lowering meets no extra scalar ops."""
    factor = getattr(spec, "value_range", 1)
    if factor == 1:
        return fn
    return lambda x: fn(x * factor) / factor


def calibration_data(spec: ModelSpec, scale: int, recipe: Recipe,
                     data_root: str | os.PathLike | None = None) -> torch.Tensor | Sequence:
    """The recipe's calibration patches in the model's input range: one tensor, or with
    ``[calibration] stream = true`` a map-style source that cuts each batch when read."""
    cfg = recipe.calibration
    value_range = getattr(spec, "value_range", 1)
    if cfg.stream:
        source = CalibrationPatches(cfg.num_patches, cfg.patch_size, scale, sets=tuple(cfg.sets),
                                    root=data_root, seed=cfg.seed, color=spec.color,
                                    batch_size=cfg.batch_size)
        return source if value_range == 1 else ScaledBatches(source, value_range)
    patches = calibration_patches(cfg.num_patches, cfg.patch_size, scale, sets=tuple(cfg.sets),
                                  root=data_root, seed=cfg.seed, color=spec.color)
    return patches * value_range  # the model's own input range


@dataclass
class ScaledBatches:
    """A map-style batch source with every batch multiplied by ``factor`` when read."""

    source: Sequence
    factor: float

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.source[index] * self.factor


@dataclass
class ZooModels:
    """A pretrained zoo network and its compiled counterpart."""

    spec: ModelSpec
    scale: int
    recipe: Recipe
    float_model: nn.Module
    quant_model: fx.GraphModule | None

    def runner(self, which: str) -> SRFunction:
        model = self.float_model if which == "fp" else self.quant_model
        return as_sr_function(model, self.spec, self.scale)


def prepare(name: str | ModelSource, scale: int | None, recipe: RecipeLike | None, *,
            data_root: str | os.PathLike | None = None, checkpoint: str | None = None,
            progress: bool = False, dump_dir: str | None = None) -> ZooModels:
    """Build the pretrained (or user-checkpointed) model and compile it with ``recipe``.
    ``name`` is a zoo name or a :class:`~fxquant.models.user.ModelSource` (an own model)."""
    source = name if isinstance(name, ModelSource) else \
        resolve_model(name, scale, weights=checkpoint)
    spec, scale = source.spec, source.scale
    # calibration patches are on the model's own scale (0..255 for a --range 255 model)
    ranged = {"input_range": (0.0, float(source.value_range))} if source.value_range != 1 else {}
    model = source.build(data_root)
    quant = None
    resolved = resolve_recipe(recipe) if recipe is not None else None
    if resolved is not None:
        calib = calibration_data(spec, scale, resolved, data_root)
        fresh = source.build(data_root)
        quant = fxquant.compile(fresh, resolved, calib=calib,
                                concrete_args={"scale": scale} if spec.takes_scale else None,
                                progress=progress, dump_dir=dump_dir, **ranged)
    return ZooModels(spec, scale, resolved, model, quant)


def refuse_with_compiled(**flags) -> None:
    """Command-line flags given with ``--compiled`` that would be ignored: its file holds the
    recipe and the trained weights (``flags``: flag name without dashes → value)."""
    from fxquant.errors import FxquantError

    given = [f"--{name}" for name, value in flags.items() if value]
    if given:
        raise FxquantError(f"{' and '.join(given)} cannot go with --compiled, whose file "
                           "holds the recipe and the trained weights")


def load_compiled(path: str | os.PathLike, *, model: str | None = None,
                  scale: int | None = None, data_root: str | os.PathLike | None = None,
                  **own) -> ZooModels:
    """FP and quantized models from a saved compiled model: the float network is the zoo
    model the file names (pretrained, or ``weights=``), or the own model named again by
    ``model="file.py:Class"`` (``own``: ``weights``, ``init``, ``color``, ``value_range``;
    missing ones come from what the file recorded)."""
    from fxquant.compiler import read_compiled
    from fxquant.models.user import source_from_compiled

    info = read_compiled(path)["model"]
    source = source_from_compiled(info, model, scale=scale, path=path, **own)
    float_model = source.build(data_root)
    quant = fxquant.load(path, source.build(data_root, pretrained=False), data_root=data_root)
    return ZooModels(source.spec, source.scale, quant.fxquant_recipe, float_model, quant)


def evaluate_sets(runner: SRFunction, spec: ModelSpec, scale: int, datasets: list[str], *,
                  data_root: str | os.PathLike | None = None, limit: int | None = None,
                  progress: bool = False, label: str = "") -> dict[str, SetScore]:
    return {ds: evaluate(runner, BenchmarkSet(ds, scale, root=data_root, limit=limit), spec.color,
                         progress=progress, label=f"{label} {ds}".strip())
            for ds in datasets}
