"""QAT checkpoints: one file, plain tensors/numbers/strings/lists/dicts, read with
``torch.load(weights_only=True)``, written whole into a temporary file that then replaces
the old one (a crash mid-write leaves the previous checkpoint intact)."""

from __future__ import annotations

import copy
import os

import torch
from torch import fx, nn

from fxquant.files import load_payload, save_payload
from fxquant.train.config import TrainError

FORMAT = "fxquant-train/1"


def compiled_info(gm: fx.GraphModule, model_name: str | None = None, scale: int | None = None,
                  user_model: dict | None = None) -> dict:
    """What rebuilds the compiled graph's structure (the fields of :func:`fxquant.save`
    without the state dict)."""
    return {"recipe": gm.fxquant_recipe.to_toml(), "pipeline": gm.fxquant_pipeline,
            "model": {"name": model_name, "scale": scale,
                      **({"user": dict(user_model)} if user_model else {})},
            "concrete_args": {k: v for k, v in (gm.fxquant_concrete_args or {}).items()
                              if isinstance(v, (int, float, str, bool))}}


def write_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    save_payload(path, {"format": FORMAT, **payload}, "training checkpoint")


def read_checkpoint(path: str | os.PathLike) -> dict:
    return load_payload(path, FORMAT, TrainError, "training checkpoint",
                        missing_hint="; give the last.ckpt of a run folder (--resume "
                                     "run_dir/last.ckpt)",
                        written_by=", written by fxquant train")


def rebuild(info: dict, float_model: nn.Module, where: str = "checkpoint") -> fx.GraphModule:
    """The compiled graph's structure from ``info`` (:func:`compiled_info`) on a copy of
    ``float_model``; its state is loaded by the caller."""
    import fxquant
    from fxquant.recipe import Recipe

    recipe = Recipe.from_toml(info["recipe"], f"{where} recipe")
    return fxquant.compile(copy.deepcopy(float_model), recipe, pipeline=info["pipeline"],
                           concrete_args=info.get("concrete_args") or None, calibrate=False)


def load_model_state(gm: nn.Module, state: dict, where: str) -> None:
    expected = gm.state_dict()
    wrong = [k for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if wrong or missing or unexpected:
        raise TrainError(f"{where} does not match the rebuilt graph (different shapes "
                         f"{wrong[:3]}, missing {missing[:3]}, unexpected {unexpected[:3]}); "
                         "resume with the float model the run started from")
    with torch.no_grad():
        gm.load_state_dict(state, strict=True)
