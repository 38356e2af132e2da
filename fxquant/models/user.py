"""Where a command's model comes from: a zoo name, or the user's own network.

``--model imdn`` names a zoo model; ``--model path/to/file.py:ClassName`` (or
``package.module:ClassName``) names the user's own, built as ``ClassName(**init)`` with
``init`` the ``--init`` JSON object, its weights from ``--weights`` (``torch.load`` with
``weights_only=True``, or ``.safetensors``), its input convention from ``--color rgb|y`` and
``--range 1|255``. User code is imported only here, when it is named on the command line.

:func:`resolve_model` is the one resolver every command uses; it returns a
:class:`ModelSource`, which builds fresh copies of the network and describes it with a
:class:`~fxquant.models.ModelSpec` (a :class:`UserModelSpec` for own models).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fxquant.errors import CheckpointError, FxquantError
from fxquant.models import ModelSpec, build_model, get_spec
from fxquant.models.checkpoint import load_checkpoint

__all__ = ["UserModelSpec", "ModelSource", "resolve_model", "is_user_model", "parse_init",
           "import_model", "COLORS", "RANGES"]

COLORS = ("rgb", "y")
RANGES = (1, 255)
_PROBE = 8  # LR side of the shape probe that finds (or checks) an own model's scale


@dataclass(frozen=True)
class UserModelSpec(ModelSpec):
    """A :class:`ModelSpec` for an own model, plus what rebuilds it: ``reference``
    (``file.py:Class``), ``init`` (constructor kwargs), ``weights`` and ``value_range`` (1: the
    model takes [0, 1] like the zoo; 255: it takes and returns 0..255)."""

    value_range: int = 1
    reference: str = ""
    init: dict = field(default_factory=dict)
    weights: str | None = None


def is_user_model(name: str | None) -> bool:
    """``file.py:Class`` or ``package.module:Class`` (zoo names have no colon)."""
    return bool(name) and ":" in name


def parse_init(text: str | dict | None) -> dict:
    """The ``--init`` JSON object as a dict; :class:`FxquantError` if it is not one."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FxquantError(f"--init {text!r} is not valid JSON ({exc.msg} at character "
                           f"{exc.pos}); give an object of constructor arguments, e.g. "
                           "--init '{\"upscale\": 4}'") from None
    if not isinstance(value, dict):
        raise FxquantError(f"--init must be a JSON object of constructor arguments, got a "
                           f"{type(value).__name__} ({text}); e.g. --init '{{\"upscale\": 4}}'")
    return value


def _import_file(path: Path):
    if not path.is_file():
        raise FxquantError(f"model file {path} does not exist; --model takes "
                           "path/to/file.py:ClassName or package.module:ClassName")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"fxquant_user_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise FxquantError(f"cannot import {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's module failed at import time: say where
        del sys.modules[module_name]
        raise FxquantError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise FxquantError(f"cannot import module {name!r} ({exc}); --model takes "
                           "path/to/file.py:ClassName or package.module:ClassName") from None
    except Exception as exc:
        raise FxquantError(f"importing {name} failed: {type(exc).__name__}: {exc}") from exc


def import_model(reference: str) -> Callable[..., nn.Module]:
    """The class (or factory function) named by ``file.py:Class`` / ``package.module:Class``."""
    where, _, attr = reference.rpartition(":")
    if not where or not attr:
        raise FxquantError(f"--model {reference!r}: expected path/to/file.py:ClassName or "
                           "package.module:ClassName")
    is_path = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(Path(where)) if is_path else _import_module(where)
    target = getattr(module, attr, None)
    if target is None or not callable(target):
        modules = [(n, v) for n, v in vars(module).items()
                   if inspect.isclass(v) and issubclass(v, nn.Module)]
        # the file's own classes; for a package, the ones it exports
        own = [n for n, v in modules if v.__module__ == module.__name__] or \
            [n for n, _ in modules][:20]
        listed = ", ".join(own) if own else "none"
        raise FxquantError(f"{where} defines no class {attr!r}; nn.Module classes it "
                           f"defines: {listed}")
    return target


def _construct(factory: Callable[..., nn.Module], init: dict, reference: str) -> nn.Module:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**init)
        except TypeError as exc:
            raise FxquantError(f"--init {json.dumps(init)} does not fit "
                               f"{reference}{signature}: {exc}") from None
    try:
        model = factory(**init)
    except Exception as exc:
        raise FxquantError(f"building {reference}(**{json.dumps(init)}) raised "
                           f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise FxquantError(f"{reference} returned a {type(model).__name__}, not a torch "
                           "nn.Module")
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    """Strict load of a .pth (weights_only=True) or .safetensors file, zoo messages."""
    load_checkpoint(model, path)


def _probe_scale(model: nn.Module, channels: int, value_range: int, reference: str) -> int:
    """The model's upscaling factor, from its output on a 1×C×8×8 input."""
    x = torch.rand(1, channels, _PROBE, _PROBE, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            out = model(x * value_range)
    except Exception as exc:
        raise FxquantError(f"{reference} fails on a 1×{channels}×{_PROBE}×{_PROBE} input "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                           f"--color {'y' if channels == 1 else 'rgb'} gives it {channels} "
                           "channel(s): check --color and --init") from None
    if not torch.is_tensor(out) or out.dim() != 4 or out.shape[1] != channels:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise FxquantError(f"{reference} returned {shape} for a 1×{channels}×{_PROBE}×{_PROBE} "
                           f"input; an SR model must return 1×{channels}×H×W (check --color)")
    h, w = out.shape[-2:]
    if h != w or h % _PROBE:
        raise FxquantError(f"{reference} maps {_PROBE}×{_PROBE} to {h}×{w}; fxquant needs an "
                           "integer upscaling factor")
    return h // _PROBE


@dataclass
class ModelSource:
    """A model a command runs: ``spec`` describes it, :meth:`build` makes a fresh copy in
    ``eval()`` mode (zoo: pretrained unless ``weights``; own: ``factory(**init)`` + weights)."""

    spec: ModelSpec
    scale: int
    weights: str | None = None
    _factory: Callable[..., nn.Module] | None = field(default=None, repr=False)

    @property
    def is_user(self) -> bool:
        return isinstance(self.spec, UserModelSpec)

    @property
    def value_range(self) -> int:
        return getattr(self.spec, "value_range", 1)

    @property
    def label(self) -> str:
        return self.spec.name

    def build(self, data_root: str | os.PathLike | None = None, *,
              pretrained: bool = True) -> nn.Module:
        if not self.is_user:
            use_pretrained = pretrained and self.weights is None
            return build_model(self.spec.name, self.scale, pretrained=use_pretrained,
                               checkpoint=self.weights if pretrained else None,
                               data_root=data_root)
        model = _construct(self._factory, self.spec.init, self.spec.reference)
        if self.weights and pretrained:
            try:
                _load_weights(model, self.weights)
            except CheckpointError as exc:
                raise CheckpointError(f"{self.spec.reference}: {exc}") from None
        return model.eval()

    def reference(self) -> dict | None:
        """What :func:`fxquant.save` stores to name an own model (no code, only strings)."""
        if not self.is_user:
            return None
        s = self.spec
        return {"reference": s.reference, "init": json.dumps(s.init), "color": s.color,
                "range": s.value_range,
                "weights": str(Path(s.weights).resolve()) if s.weights else ""}


def resolve_model(name: str, scale: int | None = None, *, weights: str | None = None,
                  init: str | dict | None = None, color: str | None = None,
                  value_range: int | None = None) -> ModelSource:
    """The :class:`ModelSource` for ``--model name`` and its flags (one resolver for every
    command). A zoo model needs ``scale``; an own model's scale is found by running it once
    on a small input and, when ``scale`` is given, checked against it."""
    if not name:
        raise FxquantError("no model: give --model NAME (see `fxquant models`) or --model "
                           "path/to/file.py:ClassName")
    if not is_user_model(name):
        own_only = [flag for flag, v in (("--init", init), ("--color", color),
                                         ("--range", value_range)) if v is not None]
        if own_only:
            raise FxquantError(f"{', '.join(own_only)} only for your own model "
                               f"(--model file.py:Class); zoo model {name!r} fixes its own")
        spec = get_spec(name)
        if scale is None:
            raise FxquantError(f"give --scale for zoo model {name!r}; valid: "
                               f"{', '.join(map(str, spec.scales))}")
        return ModelSource(spec, scale, weights)
    color = color or "rgb"
    if color not in COLORS:
        raise FxquantError(f"--color {color!r}: valid are rgb (1×3×H×W input) and y "
                           "(1×1×H×W luma, chroma upscaled bicubic)")
    value_range = 1 if value_range is None else int(value_range)
    if value_range not in RANGES:
        raise FxquantError(f"--range {value_range}: valid are 1 (input in [0, 1]) and 255 "
                           "(input in [0, 255])")
    kwargs = parse_init(init)
    factory = import_model(name)
    model = _construct(factory, kwargs, name)
    if weights:
        try:
            _load_weights(model, weights)
        except CheckpointError as exc:
            raise CheckpointError(f"{name}: {exc}") from None
    else:
        warnings.warn(f"no --weights for {name}: it runs with the weights its constructor "
                      "gives it (random unless it loads its own)", stacklevel=2)
    found = _probe_scale(model.eval(), 1 if color == "y" else 3, value_range, name)
    if scale is not None and scale != found:
        raise FxquantError(f"{name} upscales x{found}, not x{scale} (--scale); fix --scale "
                           "or --init")
    short = name if "/" not in name else f"{Path(name.rpartition(':')[0]).name}:{name.rpartition(':')[2]}"
    spec = UserModelSpec(short, (found,), color, False, description=f"own model {name}",
                         value_range=value_range, reference=name, init=kwargs, weights=weights)
    return ModelSource(spec, found, weights, factory)


def source_from_compiled(info: dict, name: str | None, *, scale: int | None = None,
                         weights: str | None = None, init: str | None = None,
                         color: str | None = None, value_range: int | None = None,
                         path: Any = "") -> ModelSource:
    """The :class:`ModelSource` of a saved compiled model (its payload's ``model`` dict),
    with the command line's flags taking precedence; an own model must be named again."""
    user = info.get("user") or None
    if scale and info.get("scale") and scale != info["scale"]:
        held = (f"{info['name']} x{info['scale']}" if info.get("name")
                else f"a x{info['scale']} model")
        raise FxquantError(f"--scale {scale} does not match {path}, which holds {held}: a "
                           "compiled model runs at the scale it was compiled for; leave out "
                           f"--scale, or compile the model again with --scale {scale}")
    if info.get("name"):
        if name and name != info["name"]:
            raise FxquantError(f"--model {name} does not match {path}, which holds "
                               f"{info['name']} x{info['scale']}")
        return resolve_model(info["name"], info["scale"], weights=weights)
    if not name:
        init = f" --init '{user['init']}'" if user and user.get("init") not in ("{}", "") else ""
        hint = f"; it was compiled from --model {user['reference']}{init}" if user else ""
        raise FxquantError(f"{path} holds your own model, and user code is imported only when "
                           f"named: give --model file.py:Class{hint}")
    user = user or {}
    return resolve_model(
        name, scale or info.get("scale"), weights=weights or user.get("weights") or None,
        init=init if init is not None else user.get("init"),
        color=color or user.get("color"),
        value_range=value_range if value_range is not None else user.get("range"))


def own_model_flags(args) -> dict:
    """``weights``, ``init``, ``color`` and ``value_range`` from a command's parsed flags
    (``--weights`` or the zoo's ``--checkpoint``, not both)."""
    weights, checkpoint = getattr(args, "weights", None), getattr(args, "checkpoint", None)
    if weights and checkpoint:
        raise FxquantError("give --weights or --checkpoint, not both (they are the same thing)")
    return {"weights": weights or checkpoint, "init": getattr(args, "init", None),
            "color": getattr(args, "color", None), "value_range": getattr(args, "range", None)}


def source_from_args(args) -> ModelSource:
    """:func:`resolve_model` on a command's ``--model``, ``--scale`` and own-model flags."""
    return resolve_model(getattr(args, "model", None), getattr(args, "scale", None),
                         **own_model_flags(args))
