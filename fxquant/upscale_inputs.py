"""What ``fxquant upscale`` reads: the input images (a file or a folder of them), checked
before the model is compiled and read with their alpha plane kept."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fxquant.data.images import _to_rgb_uint8, opened_image
from fxquant.errors import DataError

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_GREY_MODES = ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "1")
_EXPECTED = "expected a PNG, JPEG, WebP or BMP image readable by Pillow"


@dataclass
class InputImage:
    """An image as read: uint8 H×W×3 RGB (grey replicated), its alpha plane or None, and
    whether it was grey."""

    rgb: np.ndarray
    alpha: np.ndarray | None
    grey: bool


def read_input(path: str | os.PathLike) -> InputImage:
    """Read a PNG/JPEG/WebP/BMP file, keeping its alpha; :class:`DataError` if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist or is not a file")
    with opened_image(path, _EXPECTED) as image:
        image.load()
        has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
            "transparency" in image.info
        alpha = np.asarray(image.convert("RGBA"))[:, :, 3].copy() if has_alpha else None
        return InputImage(_to_rgb_uint8(image), alpha, image.mode in _GREY_MODES)


def probe_input(path: Path) -> tuple[int, int]:
    """The (height, width) of image ``path`` from its header, or :class:`DataError` if it is
    not an image Pillow can identify: read before the model is compiled (which can take
    minutes) rather than after."""
    with opened_image(path, _EXPECTED) as image:
        return image.size[1], image.size[0]


def list_inputs(source: Path) -> list[Path]:
    """The images ``fxquant upscale`` reads: ``source`` itself, or a folder's images by name."""
    if source.is_dir():
        images = sorted(p for p in source.iterdir()
                        if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not images:
            raise DataError(f"folder {source} holds no image ({', '.join(SUFFIXES)})")
        return images
    if not source.exists():
        raise DataError(f"input {source} does not exist; give an image file or a folder of "
                        f"images ({', '.join(SUFFIXES)})")
    return [source]
