"""The zoo-model workflow shared by the CLI, the results table and reports:
build a pretrained network, draw calibration patches, compile, evaluate FP against quantized."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import fx, nn

import fxquant
from fxquant.data import BenchmarkSet, calibration_patches
from fxquant.evaluate import SetScore, SRFunction, evaluate
from fxquant.models import ModelSpec, build_model, get_spec
from fxquant.recipe import Recipe, RecipeLike, resolve_recipe


def as_sr_function(model: nn.Module, spec: ModelSpec, scale: int) -> SRFunction:
    """A callable on the LR tensor alone (multi-scale nets get their scale bound)."""
    if spec.takes_scale and not isinstance(model, fx.GraphModule):
        return lambda x: model(x, scale)
    return model


def calibration_data(spec: ModelSpec, scale: int, recipe: Recipe,
                     data_root: str | os.PathLike | None = None) -> torch.Tensor:
    cfg = recipe.calibration
    return calibration_patches(cfg.num_patches, cfg.patch_size, scale, sets=tuple(cfg.sets),
                               root=data_root, seed=cfg.seed, color=spec.color)


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


def prepare(name: str, scale: int, recipe: RecipeLike | None, *,
            data_root: str | os.PathLike | None = None, checkpoint: str | None = None,
            progress: bool = False, dump_dir: str | None = None) -> ZooModels:
    """Build the pretrained (or user-checkpointed) model and compile it with ``recipe``."""
    spec = get_spec(name)
    model = build_model(name, scale, pretrained=checkpoint is None, checkpoint=checkpoint,
                        data_root=data_root)
    quant = None
    resolved = resolve_recipe(recipe) if recipe is not None else None
    if resolved is not None:
        calib = calibration_data(spec, scale, resolved, data_root)
        fresh = build_model(name, scale, pretrained=checkpoint is None, checkpoint=checkpoint,
                            data_root=data_root)
        quant = fxquant.compile(fresh, resolved, calib=calib,
                                concrete_args={"scale": scale} if spec.takes_scale else None,
                                progress=progress, dump_dir=dump_dir)
    return ZooModels(spec, scale, resolved, model, quant)


def evaluate_sets(runner: SRFunction, spec: ModelSpec, scale: int, datasets: list[str], *,
                  data_root: str | os.PathLike | None = None, limit: int | None = None,
                  progress: bool = False, label: str = "") -> dict[str, SetScore]:
    return {ds: evaluate(runner, BenchmarkSet(ds, scale, root=data_root, limit=limit), spec.color,
                         progress=progress, label=f"{label} {ds}".strip())
            for ds in datasets}
