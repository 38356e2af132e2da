"""Loading checkpoints into zoo networks, strictly and safely.

Only ``torch.load(path, map_location="cpu", weights_only=True)`` is used: a checkpoint can hold
tensors and plain containers, never arbitrary pickled objects. Accepted layouts: a bare
state_dict, or a dict that wraps it under ``params_ema``, ``params``, ``state_dict`` or ``model``
(looked up in that order, so a BasicSR file's EMA weights win; wrappers may nest). A ``module.``
prefix (``nn.DataParallel``, e.g. the IMDN releases) is stripped. Any missing key, unexpected key
or shape mismatch raises :class:`~fxquant.errors.CheckpointError`. A ``.safetensors`` file is
read with ``safetensors.torch.load_file`` (tensors only by construction).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fxquant.errors import CheckpointError
from fxquant.files import load_failure

_PICKLE_REMEDY = "save model.state_dict() instead"

WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model")
_SHOWN = 5


def _few(keys) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _unwrap(obj, path: Path) -> Mapping:
    for _ in range(4):
        if _is_state_dict(obj):
            return obj
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            # A mapping with non-tensor values and no wrapper key: let the key check report it.
            return obj
        obj = inner
    if isinstance(obj, Mapping):
        return obj
    raise CheckpointError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict (expected a dict of "
        f"tensors, possibly under one of {', '.join(WRAPPER_KEYS)})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: not a valid .safetensors file "
                              f"({exc})") from None


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its (unwrapped, ``module.``-stripped) state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, non-weights pickle, ...
        raise CheckpointError(f"cannot read checkpoint {path}: "
                              f"{load_failure(exc, _PICKLE_REMEDY)}") from exc
    state = _unwrap(obj, path)
    return {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v
            for k, v in state.items()}


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strict) and return ``model``."""
    return load_state(model, read_state_dict(path), path)


def load_state(model: nn.Module, state: Mapping, path: str | os.PathLike) -> nn.Module:
    """Load ``state`` (read from ``path``) into ``model``, strictly, with the messages above."""
    name = type(model).__name__
    expected = model.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (old checkpoints lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items()
                  if k in expected and torch.is_tensor(v) and tuple(v.shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {'; '.join(mismatched[:_SHOWN])}"
                        + (f" (and {len(mismatched) - _SHOWN} more)" if len(mismatched) > _SHOWN else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match {name}: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} does not load into {name}: {exc}") from exc
    return model
