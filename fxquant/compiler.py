"""``fxquant.compile`` and saving/loading compiled models."""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import torch
from torch import fx, nn

from fxquant.errors import CheckpointError
from fxquant.files import atomic_write_bytes
from fxquant.pipeline import PassContext, PassManager
from fxquant.recipe import Recipe, RecipeLike, resolve_recipe

FORMAT = "fxquant-compiled/1"


def compile(model: nn.Module, recipe: RecipeLike = "minmax-w8a8", calib: object = None,
            example_inputs: tuple | None = None, *, concrete_args: dict | None = None,
            pipeline: str | None = None, dump_dir: str | os.PathLike | None = None,
            progress: bool = False, calibrate: bool = True) -> fx.GraphModule:
    """Quantize ``model`` with ``recipe`` and return a GraphModule that runs like it.

    ``calib`` is a N×C×H×W tensor or an iterable of batches, used by the ``calibrate`` pass.
    ``concrete_args`` specialises non-tensor forward arguments (CARN-M's ``scale``).
    ``pipeline`` overrides the recipe's pass pipeline; ``dump_dir`` writes the graph after
    every pass. With ``calibrate=False`` the structure is built without statistics, ready
    for ``load_state_dict`` (that is how :func:`load` rebuilds a saved model).
    """
    recipe = resolve_recipe(recipe)
    ctx = PassContext(recipe=recipe, calib=calib, example_inputs=example_inputs,
                      concrete_args=concrete_args, calibrate=calibrate, progress=progress)
    manager = PassManager(pipeline or recipe.pipeline_spec, dump_dir=dump_dir)
    was_training = model.training
    model.eval()  # traced in eval mode; the user's model gets its own mode back
    try:
        gm = manager.run(model, ctx)
    finally:
        model.train(was_training)
    gm.eval()
    gm.fxquant_recipe = recipe
    gm.fxquant_pipeline = manager.spec
    gm.fxquant_history = list(ctx.history)
    gm.fxquant_concrete_args = dict(concrete_args or {})
    return gm


def lowered_copy(gm: fx.GraphModule, target: str = "cpu", *, compile: bool = False,
                 fuse: bool = True) -> fx.GraphModule:
    """A copy of compiled model ``gm`` run through ``lower{target=...}``; ``gm`` stays as it
    is. The copy's pipeline and history record the lower pass, so :func:`save` and
    :func:`load` round-trip the lowered model."""
    from fxquant.passes.lower import LowerPass

    lower = LowerPass(target=target, compile=compile, fuse=fuse)
    ctx = PassContext(recipe=gm.fxquant_recipe, concrete_args=gm.fxquant_concrete_args or None)
    lowered = PassManager([lower]).run(copy.deepcopy(gm), ctx)
    # GraphModule's deepcopy keeps modules and graph, not these attributes
    lowered.fxquant_recipe = gm.fxquant_recipe
    lowered.fxquant_concrete_args = dict(gm.fxquant_concrete_args)
    lowered.fxquant_pipeline = f"{gm.fxquant_pipeline},{lower.spec()}"
    lowered.fxquant_history = list(gm.fxquant_history) + ctx.history
    return lowered


def save(gm: fx.GraphModule, path: str | os.PathLike, *, model_name: str | None = None,
         scale: int | None = None, user_model: dict | None = None) -> None:
    """Save a compiled model as plain tensors and strings (loadable with weights_only=True).
    ``user_model`` names an own (non-zoo) model by strings alone (its ``file.py:Class``,
    ``--init`` JSON, colour, range: :meth:`fxquant.models.user.ModelSource.reference`), so
    the command line can say how to rebuild it; :func:`load` never imports it."""
    recipe: Recipe = gm.fxquant_recipe
    payload = {
        "format": FORMAT,
        "recipe": recipe.to_toml(),
        "pipeline": gm.fxquant_pipeline,
        "model": {"name": model_name, "scale": scale,
                  **({"user": dict(user_model)} if user_model else {})},
        "concrete_args": {k: v for k, v in gm.fxquant_concrete_args.items()
                          if isinstance(v, (int, float, str, bool))},
        "state_dict": gm.state_dict(),
    }
    # serialized in memory first: a failed write (disk full, file-size limit) is then a
    # plain OSError that atomic_write_bytes reports, and the old file at ``path`` is kept
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue(), "compiled model")


def read_compiled(path: str | os.PathLike) -> dict:
    """Read a saved compiled model's payload, safely (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"compiled model {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read compiled model {path}: {type(exc).__name__}: "
                              f"{exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an fxquant compiled model (expected format "
                              f"'{FORMAT}'; save one with fxquant compile or fxquant.save)")
    return payload


def load(path: str | os.PathLike, model: nn.Module | None = None, *,
         data_root: str | os.PathLike | None = None) -> fx.GraphModule:
    """Rebuild a compiled model saved by :func:`save`.

    ``model`` is the float network (with any weights: they are overwritten); when omitted the
    zoo model named in the file is built.
    """
    payload = read_compiled(path)
    recipe = Recipe.from_toml(payload["recipe"], f"{path} recipe")
    if model is None:
        from fxquant.models import build_model

        info = payload["model"]
        if not info.get("name"):
            user = info.get("user") or {}
            built = (f" ({user.get('reference')}(**{user.get('init')}))"
                     if user.get("reference") else "")
            raise CheckpointError(f"{path} names no zoo model: pass model= (the float "
                                  f"network{built})")
        model = build_model(info["name"], info["scale"], data_root=data_root)
    gm = compile(model, recipe, pipeline=payload["pipeline"],
                 concrete_args=payload.get("concrete_args") or None, calibrate=False)
    result = gm.load_state_dict(payload["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{path} does not match the rebuilt graph: missing "
                              f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return gm
