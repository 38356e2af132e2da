"""Random LR calibration patches from training sets (``<root>/train/<Set>/HR``).

Each patch is drawn from a seeded numpy Generator: an image (uniformly among the images whose LR
is at least ``patch_size`` on both sides), then a top-left corner. The image is the MATLAB bicubic
LR of the mod-``scale`` HR crop. :func:`calibration_patches` returns them as one tensor;
:class:`CalibrationPatches` is the same patches as a streamed, map-style source of batches.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image

from fxquant.data.benchmark import hr_folder, list_images
from fxquant.data.images import load_image
from fxquant.data.imresize import bicubic_downscale, mod_crop
from fxquant.errors import CalibrationError, DataError
from fxquant.metrics import rgb_to_y

__all__ = ["calibration_patches", "CalibrationPatches", "COLOR_MODES"]

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


def _patch_plan(n: int, patch_size: int, scale: int, sets, root, seed: int, color: str
                ) -> tuple[list, list[tuple[int, int, int]]]:
    """The images that fit and each patch's ``(image, top, left)``, drawn from the seed with
    the images' header sizes only (the LR of a mod-``scale`` HR is ``h // scale`` high)."""
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
    fitting, lr_sizes = [], []
    for path in paths:
        height, width = _image_size(path)
        if height // scale >= patch_size and width // scale >= patch_size:
            fitting.append(path)
            lr_sizes.append((height // scale, width // scale))
    if not fitting:
        raise CalibrationError(
            f"no image of {', '.join(sets)} ({len(paths)} images) has an x{scale} LR of at least "
            f"{patch_size}×{patch_size} pixels; use a smaller patch_size or scale")
    rng = np.random.default_rng(seed)
    plan = []
    for _ in range(n):
        index = int(rng.integers(len(fitting)))
        height, width = lr_sizes[index]
        top = int(rng.integers(height - patch_size + 1))
        left = int(rng.integers(width - patch_size + 1))
        plan.append((index, top, left))
    return fitting, plan


def _lr_and_hr(path, scale: int) -> tuple[np.ndarray, np.ndarray]:
    hr = mod_crop(load_image(path), scale)
    return bicubic_downscale(hr, scale), hr


def calibration_patches(n: int, patch_size: int, scale: int, sets=("T91",),
                        root: str | os.PathLike | None = None,
                        seed: int = 0, color: str = "rgb", with_hr: bool = False,
                        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``n`` LR patches, float32 ``n×C×p×p`` in [0, 1] (C=3 RGB, or C=1 Y/255 for ``"y"``).

    With ``with_hr=True`` returns ``(lr, hr)`` where ``hr`` holds the aligned
    ``(p·scale)×(p·scale)`` patches of the mod-cropped HR images. Each image is decoded and
    downscaled at most once per call; :class:`CalibrationPatches` streams the same patches.
    """
    fitting, plan = _patch_plan(n, patch_size, scale, sets, root, seed, color)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    lr_patches, hr_patches = [], []
    for index, top, left in plan:
        if index not in cache:
            cache[index] = _lr_and_hr(fitting[index], scale)
        lr, hr = cache[index]
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


class CalibrationPatches:
    """The patches of :func:`calibration_patches` as a map-style source of batches, cut from
    the image files when a batch is read: ``len`` batches of ``batch_size`` (the last may be
    smaller), ``[i]`` a ``b×C×p×p`` tensor equal to rows ``i·b … i·b + b − 1`` of
    ``calibration_patches`` with the same arguments. ``fxquant.compile`` streams such a source
    (``[calibration] stream = true``): only the batch in use and the last ``cache_images``
    decoded images are in memory, however many patches there are."""

    def __init__(self, n: int, patch_size: int, scale: int, sets=("T91",),
                 root: str | os.PathLike | None = None, seed: int = 0, color: str = "rgb",
                 batch_size: int = 8, cache_images: int = 16):
        if batch_size < 1:
            raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
        self.patch_size, self.scale, self.color = patch_size, scale, color
        self.batch_size, self.cache_images = batch_size, max(1, int(cache_images))
        self.paths, self.plan = _patch_plan(n, patch_size, scale, sets, root, seed, color)
        self._images: OrderedDict[int, np.ndarray] = OrderedDict()  # LRU of decoded LR images

    def __len__(self) -> int:
        return -(-len(self.plan) // self.batch_size)

    def _lr(self, index: int) -> np.ndarray:
        if index in self._images:
            self._images.move_to_end(index)
        else:
            self._images[index] = _lr_and_hr(self.paths[index], self.scale)[0]
            if len(self._images) > self.cache_images:
                self._images.popitem(last=False)
        return self._images[index]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"batch {i} of {len(self)}")
        i %= len(self)
        p = self.patch_size
        rows = []
        for index, top, left in self.plan[i * self.batch_size:(i + 1) * self.batch_size]:
            rows.append(_to_channels_first(self._lr(index)[top:top + p, left:left + p],
                                           self.color))
        return torch.from_numpy(np.stack(rows))

    def __repr__(self) -> str:
        return (f"CalibrationPatches({len(self.plan)} patches of {self.patch_size}² in "
                f"{len(self)} batches of {self.batch_size}, x{self.scale}, {self.color})")
