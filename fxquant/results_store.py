"""The results table's inputs: its TOML config, its JSON stores, and the fingerprint of a cell.

A stored cell (one model × scale × recipe × dataset × image subset) is keyed by a readable
``model|xS|recipe|dataset|limit`` string, and carries a ``fingerprint`` of everything else that
determines its numbers:

- ``recipe``: a hash of the resolved recipe's canonical TOML (``fp`` for the float model), so
  editing a recipe file or preset invalidates its cells, whatever its name;
- ``weights``: a hash of the bytes of the pretrained weight file the model loads;
- ``code``: :data:`CODE_VERSION`, bumped by hand when a change moves measured numbers.

The dataset and the image subset (``limit``) are part of the key itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fxquant.errors import FxquantError, RecipeError, StoreError
from fxquant.recipe import tomllib

FP = "fp"
# Bump when a change to evaluation, data loading or a quantizer moves measured PSNR/SSIM:
# every stored cell is then recomputed by the next `fxquant table`.
CODE_VERSION = 1
ENTRY_FIELDS = ("model", "scale", "recipe", "dataset", "limit", "psnr", "ssim")


@dataclass(frozen=True)
class RunSpec:
    models: tuple[str, ...]
    scales: tuple[int, ...]
    recipes: tuple[str, ...]
    datasets: tuple[str, ...]
    limit: int | None = None


_LIST_KEYS = {"models": (str, '["imdn", "pan"]'), "scales": (int, "[4, 2]"),
              "recipes": (str, '["mse-w4a4"]'), "datasets": (str, '["Set5", "Urban100"]')}


def _read_text(path: Path, what: str, error: type[FxquantError]) -> str:
    if not path.is_file():
        raise error(f"{what} {path} does not exist" if not path.exists()
                    else f"{what} {path} is not a file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path} is not UTF-8 text (byte {exc.start} is "
                    f"{path.read_bytes()[exc.start:exc.start + 1]!r}); is it a binary file?") \
            from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _list_of(value, key: str, where: str) -> tuple:
    kind, example = _LIST_KEYS[key]
    if isinstance(value, str) or not isinstance(value, list):
        raise RecipeError(f"{where}: '{key}' must be a list of {kind.__name__}s, e.g. {key} = "
                          f"{example}; got {value!r}")
    if not value:
        raise RecipeError(f"{where}: '{key}' is empty; give at least one, e.g. {key} = {example}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind) or (kind is int and item < 1) \
                or (kind is str and not item.strip()):
            what = "positive integers" if kind is int else "non-empty strings"
            raise RecipeError(f"{where}: '{key}' must hold {what}, e.g. {key} = {example}; "
                              f"got {item!r} in {value!r}")
    return tuple(value)


def read_config(path: str | os.PathLike) -> list[RunSpec]:
    """The ``[[run]]`` tables of a results config, each checked: the four lists present,
    lists of the right element type, ``limit`` a positive integer when given."""
    path = Path(path)
    text = _read_text(path, "results config", RecipeError)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"results config {path} is not valid TOML: {exc}") from None
    runs = data.get("run")
    if not isinstance(runs, list) or not runs:
        raise RecipeError(f"{path}: expected one or more [[run]] tables (each with models, "
                          "scales, recipes, datasets and optionally limit)")
    specs = []
    valid = set(_LIST_KEYS) | {"limit"}
    for index, run in enumerate(runs):
        where = f"{path}: [[run]] {index + 1}"
        if not isinstance(run, dict):
            raise RecipeError(f"{where}: expected a table, got {run!r}")
        unknown = set(run) - valid
        if unknown:
            raise RecipeError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(valid)}")
        missing = [k for k in _LIST_KEYS if k not in run]
        if missing:
            raise RecipeError(f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)}; every run needs "
                              f"{', '.join(_LIST_KEYS)}")
        limit = run.get("limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise RecipeError(f"{where}: 'limit' must be a positive integer (the first N "
                              f"images of each set), or left out for whole sets; got {limit!r}")
        specs.append(RunSpec(*(_list_of(run[k], k, where) for k in _LIST_KEYS), limit))
    return specs


def cell_key(model: str, scale: int, recipe: str, dataset: str, limit: int | None) -> str:
    return f"{model}|x{scale}|{recipe}|{dataset}|{limit or 'all'}"


def load_store(path: str | os.PathLike) -> dict:
    """A store's entries by key; ``{}`` when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        return {}
    text = _read_text(path, "results store", StoreError)
    fix = "fix it, or delete it to have fxquant table recompute its cells"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StoreError(f"results store {path} is not valid JSON ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise StoreError(f"{path} is not a results store: expected a JSON object of entries "
                         f"keyed 'model|xS|recipe|dataset|limit', got a {type(data).__name__}; "
                         f"{fix}")
    for key, entry in data.items():
        if not isinstance(entry, dict) or any(f not in entry for f in ENTRY_FIELDS):
            raise StoreError(f"{path}: entry '{key}' is not a result (expected an object with "
                             f"{', '.join(ENTRY_FIELDS)}); {fix}")
        if "pass_s" in entry and not _is_pass_seconds(entry["pass_s"]):
            raise StoreError(f"{path}: entry '{key}' has 'pass_s' {entry['pass_s']!r}; expected "
                             "a list of [pass name, seconds] pairs, e.g. [[\"calibrate\", 40.3]]; "
                             f"{fix}")
    return data


def _is_pass_seconds(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
        and isinstance(pair[1], (int, float)) and not isinstance(pair[1], bool) and pair[1] >= 0
        for pair in value)


def load_all_stores(folder: str | os.PathLike) -> dict:
    merged: dict = {}
    for path in sorted(Path(folder).glob("*.json")):
        merged.update(load_store(path))
    return merged


def store_text(results: dict) -> str:
    return json.dumps(results, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------- fingerprints
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | os.PathLike) -> str:
    """SHA-256 (first 16 hex digits) of a file's bytes, cached in-process by (path, size,
    mtime) so that a table hashes each weight file once."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()[:16]
    return _FILE_HASHES[key]


# Recipe fields added after results were stored, at the default that behaves as before: left
# out of the hash, so adding a field does not make every stored result stale.
NEUTRAL_DEFAULTS = (("layers", "first_last_bits", 0), ("layers", "tail_bits", 0),
                    ("calibration", "stream", False))


def recipe_hash(recipe: str) -> str:
    """Hash of the resolved recipe's canonical TOML (``fp`` for the float model)."""
    if recipe == FP:
        return FP
    from fxquant.recipe import resolve_recipe

    text = resolve_recipe(recipe).to_toml(omit=NEUTRAL_DEFAULTS)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(model: str, scale: int, data_root: str | os.PathLike | None = None) -> str:
    """Hash of the pretrained weight file ``model`` loads at ``scale`` (``none`` for a zoo
    model without pretrained weights)."""
    from fxquant.models import get_spec
    from fxquant.paths import weights_path

    spec = get_spec(model)
    if scale not in spec.weight_files:
        return "none"
    return file_hash(weights_path(spec.weight_files[scale], data_root))


def fingerprint(model: str, scale: int, recipe: str,
                data_root: str | os.PathLike | None = None) -> dict:
    return {"recipe": recipe_hash(recipe), "weights": weights_hash(model, scale, data_root),
            "code": CODE_VERSION}


def fingerprint_change(stored: dict, current: dict) -> str:
    """Why a stored fingerprint no longer matches, in words."""
    reasons = []
    if stored.get("recipe") != current["recipe"]:
        reasons.append("the recipe changed")
    if stored.get("weights") != current["weights"]:
        reasons.append("the weights file changed")
    if stored.get("code") != current["code"]:
        reasons.append(f"code version {stored.get('code')} -> {current['code']}")
    return ", ".join(reasons) or "the fingerprint changed"
