"""``fxquant.compile`` and saving/loading compiled models."""

from __future__ import annotations

import copy
import os

import torch
from torch import fx, nn

from fxquant.calibration import prepare_calibration
from fxquant.checks import (
    check_compiled,
    check_model_finite,
    check_model_float32,
    check_not_compiled,
    check_quantized,
    check_state_finite,
)
from fxquant.errors import CheckpointError, FxquantError
from fxquant.files import load_payload, save_payload
from fxquant.pipeline import PassContext, PassManager
from fxquant.recipe import Recipe, RecipeLike, resolve_recipe

FORMAT = "fxquant-compiled/1"


def compile(model: nn.Module, recipe: RecipeLike = "minmax-w8a8", calib: object = None,
            example_inputs: tuple | None = None, *, concrete_args: dict | None = None,
            pipeline: str | None = None, dump_dir: str | os.PathLike | None = None,
            progress: bool = False, calibrate: bool = True,
            input_range: tuple[float, float] | None = (0.0, 1.0),
            allow_unquantized: bool = False) -> fx.GraphModule:
    """Quantize ``model`` with ``recipe`` and return a GraphModule that runs like it.

    ``calib`` is a N×C×H×W tensor or an iterable of batches, used by the ``calibrate`` pass.
    ``concrete_args`` specialises non-tensor forward arguments (CARN-M's ``scale``).
    ``pipeline`` overrides the recipe's pass pipeline; ``dump_dir`` writes the graph after
    every pass. With ``calibrate=False`` the structure is built without statistics, ready
    for ``load_state_dict`` (that is how :func:`load` rebuilds a saved model).

    Checked before any pass runs: the model is a float network (not already compiled) with
    finite weights, and ``calib`` is float data inside ``input_range`` (the zoo's models take
    [0, 1]; ``None`` skips the check); a generator is read once into a list. A compile that
    quantizes nothing is an error naming the rule that left every layer out, unless
    ``allow_unquantized=True``.
    """
    recipe = resolve_recipe(recipe)
    if not isinstance(model, nn.Module):
        raise FxquantError(f"fxquant.compile takes a torch.nn.Module, got {type(model).__name__}")
    check_not_compiled(model)
    check_model_float32(model)
    if calibrate:
        check_model_finite(model)
        calib = prepare_calibration(calib, input_range)
    ctx = PassContext(recipe=recipe, calib=calib, example_inputs=example_inputs,
                      concrete_args=concrete_args, calibrate=calibrate, progress=progress)
    manager = PassManager(pipeline or recipe.pipeline_spec, dump_dir=dump_dir)
    was_training = model.training
    model.eval()  # traced in eval mode; the user's model gets its own mode back
    try:
        gm = manager.run(model, ctx)
    finally:
        model.train(was_training)
    if not allow_unquantized:
        check_quantized(gm, manager.spec, ctx.history, ctx.state.get("skipped_layers"))
    gm.eval()
    gm.fxquant_recipe = recipe
    gm.fxquant_pipeline = manager.spec
    gm.fxquant_history = list(ctx.history)
    gm.fxquant_pass_seconds = list(ctx.seconds)  # wall time of each history entry
    gm.fxquant_concrete_args = dict(concrete_args or {})
    return gm


def compiled_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of compiled model ``gm``, its recipe, pipeline and history
    included (GraphModule's deepcopy keeps modules and graph, not these attributes)."""
    result = copy.deepcopy(gm)
    for name in ("fxquant_recipe", "fxquant_concrete_args", "fxquant_pipeline",
                 "fxquant_history", "fxquant_pass_seconds"):
        if hasattr(gm, name):
            setattr(result, name, copy.copy(getattr(gm, name)))
    return result


def transformed_copy(gm: fx.GraphModule, pipeline, *, calib: object = None,
                     recipe: RecipeLike | None = None) -> fx.GraphModule:
    """A copy of compiled model ``gm`` run through more passes (a textual pipeline such as
    ``"fold-offsets"``, or a list of :class:`Pass`); ``gm`` stays as it is. The copy's pipeline
    and history record the passes, so :func:`save` and :func:`load` round-trip it.

    ``recipe`` (default: ``gm``'s) is the recipe the passes read and the copy carries: a copy
    that changes method — ODM's offsets added to a plain QAT start, whose training hooks
    ``fxquant train`` takes from the recipe's method — says so here. Its quantization
    sections must equal ``gm``'s, since :func:`load` rebuilds the whole pipeline with it."""
    check_compiled(gm, "transformed_copy")
    recipe = gm.fxquant_recipe if recipe is None else resolve_recipe(recipe)
    start = gm.fxquant_recipe
    changed = [name for name in ("weights", "activations", "layers", "tracing")
               if getattr(recipe, name) != getattr(start, name)]
    if changed:
        raise FxquantError(f"transformed_copy: recipe '{recipe.name}' differs from the compiled "
                           f"model's ('{start.name}') in [{', '.join(changed)}]; a copy may "
                           "change method and options only, since load rebuilds the whole "
                           "pipeline with one recipe")
    manager = PassManager(pipeline)
    ctx = PassContext(recipe=recipe, calib=calib, concrete_args=gm.fxquant_concrete_args or None)
    result = manager.run(compiled_copy(gm), ctx)
    result.fxquant_recipe = recipe
    result.fxquant_pipeline = f"{gm.fxquant_pipeline},{manager.spec}"
    result.fxquant_history = list(gm.fxquant_history) + ctx.history
    result.fxquant_pass_seconds = list(getattr(gm, "fxquant_pass_seconds", [])) + ctx.seconds
    return result


def lowered_copy(gm: fx.GraphModule, target: str = "cpu", *, compile: bool = False,
                 dynamic: bool = False, fuse: bool = True, planes: int = 2,
                 subset_codes: str = "exact") -> fx.GraphModule:
    """A copy of compiled model ``gm`` run through ``lower{target=...}`` (options as the
    pass's: ``dynamic`` compiles one graph for every input size, ``planes`` is DAQ's/DFSQ's
    int8 weight planes, ``subset_codes`` DFSQ's codes, exact or one byte); ``gm`` stays as
    it is. The copy's pipeline and history record the
    lower pass, so :func:`save` and :func:`load` round-trip the lowered model."""
    from fxquant.lower.conv import LoweringError
    from fxquant.passes.lower import LowerPass

    check_compiled(gm, "lowered_copy", LoweringError)
    if getattr(gm, "fxquant_lowered", None):
        raise LoweringError(f"the model is already lowered (target '{gm.fxquant_lowered}'); "
                            "lower the compiled fake-quant model instead")
    return transformed_copy(gm, [LowerPass(target=target, compile=compile, dynamic=dynamic,
                                           fuse=fuse, planes=planes, subset_codes=subset_codes)])


def save(gm: fx.GraphModule, path: str | os.PathLike, *, model_name: str | None = None,
         scale: int | None = None, user_model: dict | None = None) -> None:
    """Save a compiled model as plain tensors and strings (loadable with weights_only=True).
    ``user_model`` names an own (non-zoo) model by strings alone (its ``file.py:Class``,
    ``--init`` JSON, colour, range: :meth:`fxquant.models.user.ModelSource.reference`), so
    the command line can say how to rebuild it; :func:`load` never imports it."""
    check_compiled(gm, "fxquant.save")
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
    save_payload(path, payload, "compiled model")


def read_compiled(path: str | os.PathLike) -> dict:
    """Read a saved compiled model's payload, safely (weights_only=True)."""
    return load_payload(path, FORMAT, CheckpointError, "compiled model",
                        written_by="; save one with fxquant compile or fxquant.save")


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
    state = payload["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no state_dict of tensors; save it with fxquant.save")
    check_state_finite(state, str(path))
    # a network other than the file's may leave every layer out: the state dicts then differ,
    # and that (below) is the error to give, not "nothing was quantized"
    gm = compile(model, recipe, pipeline=payload["pipeline"],
                 concrete_args=payload.get("concrete_args") or None, calibrate=False,
                 allow_unquantized=True)
    expected = gm.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    if wrong:
        key, saved, built = wrong[0]
        raise CheckpointError(f"{path} was compiled from a different network: '{key}' has shape "
                              f"{saved} in the file but {built} in the model given "
                              f"({len(wrong)} tensors differ); pass the same architecture "
                              "(width, depth, scale) the file was compiled from")
    result = gm.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        extra, lacking = result.unexpected_keys, result.missing_keys
        parts = ([f"{len(extra)} tensors of the file have no place in the graph its recipe "
                  f"builds on the model given (e.g. {extra[:3]})"] if extra else []) + \
                ([f"that graph has {len(lacking)} tensors the file does not hold (e.g. "
                  f"{lacking[:3]})"] if lacking else [])
        raise CheckpointError(f"{path} does not match the model given, a different network: "
                              f"{'; '.join(parts)}; pass the same architecture (width, depth, "
                              "scale) the file was compiled from")
    return gm
