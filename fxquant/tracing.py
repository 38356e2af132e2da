"""Symbolic tracing of SR models, with errors that point at the line that could not be traced."""

from __future__ import annotations

import copy

import inspect
import os
import traceback
from typing import Any

import torch
from torch import fx, nn

from fxquant.errors import RecipeError, TraceFailure

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


class SRTracer(fx.Tracer):
    """An FX tracer that keeps user-declared leaf modules opaque and remembers which
    module it was inside when tracing failed."""

    def __init__(self, leaf_names: set[str] = frozenset(), leaf_types: set[str] = frozenset()):
        super().__init__()
        self.leaf_names = set(leaf_names)
        self.leaf_types = set(leaf_types)
        self.module_trail: list[tuple[str, str]] = []
        self.failed_trail: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_types:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        self.module_trail.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_trail is None:
                self.failed_trail = list(self.module_trail)
            raise
        finally:
            self.module_trail.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the model's code, not torch's or ours."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and path != _THIS_FILE:
            return frame
    return None


def _check_leaves(model: nn.Module, leaves: list[str]) -> tuple[set[str], set[str]]:
    names = {name for name, _ in model.named_modules()}
    types = {type(m).__name__ for m in model.modules()}
    leaf_names, leaf_types = set(), set()
    for leaf in leaves:
        if leaf in names:
            leaf_names.add(leaf)
        elif leaf in types:
            leaf_types.add(leaf)
        else:
            raise RecipeError(f"tracing.leaf_modules: '{leaf}' is neither a module name nor a "
                              f"module class of {type(model).__name__}; e.g. "
                              f"{', '.join(sorted(n for n in names if n)[:5])}")
    return leaf_names, leaf_types


def trace(model: nn.Module, leaf_modules: list[str] | tuple[str, ...] = (),
          concrete_args: dict | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that runs like it.

    Non-tensor ``concrete_args`` (e.g. CARN-M's ``scale``) are specialised: the traced
    module asserts the value and takes it as a default, so ``gm(x)`` works.
    """
    if not isinstance(model, nn.Module):
        raise TraceFailure(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    leaf_names, leaf_types = _check_leaves(model, list(leaf_modules))
    params = list(inspect.signature(model.forward).parameters)
    unknown = sorted(set(concrete_args or {}) - set(params))
    if unknown:  # FX would ignore them, and the model would be traced unspecialised
        raise TraceFailure(f"concrete_args names {', '.join(map(repr, unknown))}, which "
                           f"{type(model).__name__}.forward does not take (its arguments: "
                           f"{', '.join(params) or 'none'})")
    tracer = SRTracer(leaf_names, leaf_types)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # FX raises many kinds (TraceError, TypeError, RuntimeError)
        raise _explain_failure(model, tracer, exc, concrete_args) from exc
    # GraphModule shares the root's submodules: copy them, so that no later pass (folding,
    # weight quantization, lowering, training) can reach the user's float model.
    gm = fx.GraphModule(copy.deepcopy(tracer.root), graph, type(model).__name__)
    if concrete_args:
        _default_specialised_args(model, gm, concrete_args)
    return gm


def _explain_failure(model: nn.Module, tracer: SRTracer, exc: Exception,
                     concrete_args: dict | None) -> TraceFailure:
    scope = tracer.failed_trail or []
    if scope:
        qualname, cls = scope[-1]
        where = f"module '{qualname}' ({cls})" if qualname else f"the top-level {cls}"
    else:
        where = f"the top-level {type(model).__name__}"
    frame = _user_frame(exc)
    line = f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
    params = list(inspect.signature(model.forward).parameters)[1:]
    hint_args = (f", or give concrete_args for {', '.join(params)}"
                 if params and not concrete_args else "")
    leaf = scope[-1][0] if scope and scope[-1][0] else None
    hint_leaf = (f"declare it a leaf in the recipe ([tracing] leaf_modules = [\"{leaf}\"])"
                 if leaf else "rewrite the data-dependent control flow in forward()")
    return TraceFailure(f"cannot trace {where}{line}: {type(exc).__name__}: {exc}. "
                        f"To fix: {hint_leaf}{hint_args}.")


def _default_specialised_args(model: nn.Module, gm: fx.GraphModule, concrete_args: dict) -> None:
    names = list(inspect.signature(model.forward).parameters)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for name, node in zip(names, placeholders):
        value = concrete_args.get(name)
        if name in concrete_args and value is not None and not isinstance(value, torch.Tensor):
            node.args = (value,)
    gm.recompile()
