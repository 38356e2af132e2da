"""Reading and writing 8-bit RGB images.

Every image enters fxquant as a uint8 H×W×3 RGB array: greyscale files (modes L, LA, I;16, I, F,
1, and palettes without colour) become three identical channels, alpha is dropped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from fxquant.errors import DataError
from fxquant.files import atomic_output

__all__ = ["load_image", "save_image"]

_EXPECTED = "expected a PNG/BMP/JPEG image readable by Pillow"


def _to_rgb_uint8(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("RGB", "L"):
        array = np.asarray(image.convert("RGB"))
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits (Pillow's own "I"→"L" conversion clips instead).
        wide = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16).astype(np.int64)
        shift = 8 if mode.startswith("I;16") or wide.max(initial=0) > 255 else 0
        grey = np.clip(wide >> shift, 0, 255).astype(np.uint8)
        array = np.repeat(grey[:, :, None], 3, axis=2)
    elif mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        array = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        # P, PA, LA, RGBA, CMYK, YCbCr, 1 ...: Pillow converts to RGB, discarding alpha.
        array = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(array, dtype=np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load an image file as a uint8 H×W×3 RGB array, or raise :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image {path} does not exist or is not a file; {_EXPECTED}")
    with opened_image(path) as image:
        image.load()
        return _to_rgb_uint8(image)


# what Pillow raises for a file it cannot read, header or pixels
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, SyntaxError,
               Image.DecompressionBombError)


@contextlib.contextmanager
def opened_image(path: str | os.PathLike, expected: str = _EXPECTED) -> Iterator[Image.Image]:
    """``Image.open(path)`` (lazy: the header only until ``load``), with whatever Pillow
    raises for an unreadable file, in the ``with`` block too, turned into :class:`DataError`
    naming ``path`` and ``expected``."""
    try:
        with Image.open(path) as image:
            yield image
    except _UNREADABLE as exc:
        raise DataError(f"cannot read image {path} ({exc}); {expected}") from exc


def save_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save a uint8 H×W×3 (or H×W greyscale) array; the format follows the file extension."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(
            f"save_image expects a uint8 H×W×3 or H×W array, got {array.dtype} {array.shape}")
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"save_image: cannot tell the image format from {path.name!r}; use "
                         ".png, .bmp or .jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "image") as tmp:  # a failed write keeps the old image
        Image.fromarray(array).save(tmp, format=fmt)
