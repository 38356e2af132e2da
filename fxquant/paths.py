"""Finding the data root: ``--data`` first, then ``FXQUANT_DATA``."""

from __future__ import annotations

import os
from pathlib import Path

from fxquant.errors import DataError

DATA_ENV = "FXQUANT_DATA"

EXPECTED_LAYOUT = (
    "expected a folder holding benchmark/<Set>/HR (and optionally LR_bicubic/X<s>), "
    "train/<Set>/HR and weights/*.pth"
)


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Return the data root, or raise :class:`DataError` saying where it was looked for."""
    if explicit is not None:
        source, value = "--data", str(explicit)
    elif os.environ.get(DATA_ENV):
        source, value = DATA_ENV, os.environ[DATA_ENV]
    else:
        raise DataError(
            f"no data root given: pass --data PATH or set {DATA_ENV}=PATH; {EXPECTED_LAYOUT}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} (from {source}) is not a folder; {EXPECTED_LAYOUT}")
    return root


def weights_path(filename: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a pretrained weight file under ``<root>/weights``."""
    path = data_root(root) / "weights" / filename
    if not path.is_file():
        raise DataError(f"pretrained weights {filename} not found: expected {path}")
    return path
