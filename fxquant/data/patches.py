"""Random LR calibration patches from training sets (``<root>/train/<Set>/HR``).

Each patch is drawn from a seeded numpy Generator: an image (uniformly among the images whose LR
is at least ``patch_size`` on both sides), then a top-left corner. The image is the MATLAB bicubic
LR of the mod-``scale`` HR crop; each image is decoded and downscaled at most once per call.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from fxquant.data.benchmark import hr_folder, list_images
from fxquant.data.images import load_image
from fxquant.data.imresize import bicubic_downscale, mod_crop
from fxquant.errors import CalibrationError, DataError
from fxquant.metrics import rgb_to_y

__all__ = ["calibration_patches", "COLOR_MODES"]

COLOR_MODES = ("rgb", "y")


def _image_size(path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as exc:
        raise DataError(f"cannot read image {path} ({exc}); expected a PNG/BMP/JPEG image "
                        "readable by Pillow") from exc
    return height, width


def _to_channels_first(patch: np.ndarray, color: str) -> np.ndarray:
    if color == "y":
        return (rgb_to_y(patch) / 255.0)[None].astype(np.float32)
    return (patch.transpose(2, 0, 1) / np.float32(255.0)).astype(np.float32)


def calibration_patches(n: int, patch_size: int, scale: int, sets=("T91",),
                        root: str | os.PathLike | None = None,
                        seed: int = 0, color: str = "rgb", with_hr: bool = False,
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``n`` LR patches, float32 ``n×C×p×p`` in [0, 1] (C=3 RGB, or C=1 Y/255 for ``"y"``).

    With ``with_hr=True`` returns ``(lr, hr)`` where ``hr`` holds the aligned
    ``(p·scale)×(p·scale)`` patches of the mod-cropped HR images.
    """
    if n < 1:
        raise CalibrationError(f"need at least one calibration patch, got n={n}")
    if patch_size < 1:
        raise CalibrationError(f"patch_size must be >= 1, got {patch_size}")
    if not isinstance(scale, int) or scale < 1:
        raise CalibrationError(f"scale must be a positive int, got {scale!r}")
    if color not in COLOR_MODES:
        raise CalibrationError(f"color must be one of {COLOR_MODES}, got {color!r}")
    if isinstance(sets, str):
        sets = (sets,)

    paths = [p for name in sets for p in list_images(hr_folder("train", name, root))]
    fitting = []
    for path in paths:
        height, width = _image_size(path)
        if height // scale >= patch_size and width // scale >= patch_size:
            fitting.append(path)
    if not fitting:
        raise CalibrationError(
            f"no image of {', '.join(sets)} ({len(paths)} images) has an x{scale} LR of at least "
            f"{patch_size}×{patch_size} pixels; use a smaller patch_size or scale")

    rng = np.random.default_rng(seed)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    lr_patches, hr_patches = [], []
    for _ in range(n):
        index = int(rng.integers(len(fitting)))
        if index not in cache:
            hr = mod_crop(load_image(fitting[index]), scale)
            cache[index] = (bicubic_downscale(hr, scale), hr)
        lr, hr = cache[index]
        top = int(rng.integers(lr.shape[0] - patch_size + 1))
        left = int(rng.integers(lr.shape[1] - patch_size + 1))
        lr_patches.append(_to_channels_first(
            lr[top:top + patch_size, left:left + patch_size], color))
        if with_hr:
            hr_patches.append(_to_channels_first(
                hr[top * scale:(top + patch_size) * scale,
                   left * scale:(left + patch_size) * scale], color))

    lr_tensor = torch.from_numpy(np.stack(lr_patches))
    if with_hr:
        return lr_tensor, torch.from_numpy(np.stack(hr_patches))
    return lr_tensor
