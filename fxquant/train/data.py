"""Random LR/HR training patches for quantization-aware training.

:class:`PatchSampler` holds HR images (``<data>/train/<Set>/HR``, e.g. T91 and General100,
each mod-cropped to the scale) and their LR made by fxquant's MATLAB-bicubic downscale (the
benchmarks' degradation), each computed once, when an image is first drawn.

Every random choice comes from one ``torch.Generator`` passed to :meth:`sample`, so the
generator's state (one tensor) is the whole data position: a checkpoint stores it and a
resumed run draws exactly the batches the uninterrupted run would have. For a global batch
of ``B`` the sampler draws, in this order, ``B`` image indices, ``B`` top and ``B`` left
fractions, and ``B × 3`` augmentation bits (horizontal flip, vertical flip, transpose: the
eight rotations/flips of a square); then it builds only rows ``[lo, hi)``. Every rank of a
distributed run draws the same global batch and builds its own disjoint slice, so ``world``
ranks together see exactly the batch one process would.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from fxquant.data.benchmark import hr_folder, list_images
from fxquant.data.images import load_image
from fxquant.data.imresize import bicubic_downscale, mod_crop
from fxquant.metrics import rgb_to_y
from fxquant.train.config import TrainError

__all__ = ["PatchSampler"]


def _channels_first(patch: np.ndarray, color: str) -> torch.Tensor:
    if color == "y":
        return torch.from_numpy((rgb_to_y(patch) / 255.0)[None].astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1))).float() / 255.0


class PatchSampler:
    """LR patches ``patch × patch`` and the aligned HR patches ``patch·scale`` square, in
    [0, 1] (RGB, or Y/255 for ``color="y"``), from ``images``: HR uint8 H×W×3 arrays or
    image paths (too-small images are left out)."""

    def __init__(self, images: Sequence[np.ndarray | str | os.PathLike], scale: int, patch: int,
                 *, color: str = "rgb", augment: bool = True, where: str = "training images"):
        if color not in ("rgb", "y"):
            raise TrainError(f"color {color!r} is invalid; valid: rgb, y")
        self.scale, self.patch, self.color, self.augment = scale, patch, color, augment
        self._images = list(images)
        if not self._images:
            raise TrainError(f"no {where} to train on")
        self._pairs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.sizes = [self._lr_size(i) for i in range(len(self._images))]
        self.usable = [i for i, (h, w) in enumerate(self.sizes) if h >= patch and w >= patch]
        if not self.usable:
            raise TrainError(f"none of the {len(self._images)} {where} has an x{scale} LR of at "
                             f"least {patch}x{patch} pixels; use a smaller --patch")

    @classmethod
    def from_sets(cls, sets: Sequence[str], scale: int, patch: int, *,
                  root: str | os.PathLike | None = None, color: str = "rgb",
                  augment: bool = True) -> "PatchSampler":
        """HR images of ``<root>/train/<Set>/HR`` for each set, in file-name order."""
        paths = [p for name in sets for p in list_images(hr_folder("train", name, root))]
        return cls(paths, scale, patch, color=color, augment=augment,
                   where=f"images of {', '.join(sets)}")

    def _lr_size(self, index: int) -> tuple[int, int]:
        item = self._images[index]
        if isinstance(item, np.ndarray):
            height, width = item.shape[:2]
        else:
            from PIL import Image

            try:
                with Image.open(item) as image:
                    width, height = image.size
            except OSError as exc:
                raise TrainError(f"cannot read training image {item} ({exc}); expected an "
                                 "image Pillow can read") from None
        return height // self.scale, width // self.scale

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(LR, mod-cropped HR) of image ``index``, uint8 H×W×3, computed once."""
        if index not in self._pairs:
            item = self._images[index]
            image = item if isinstance(item, np.ndarray) else load_image(item)
            hr = mod_crop(np.asarray(image, dtype=np.uint8), self.scale)
            self._pairs[index] = (bicubic_downscale(hr, self.scale), hr)
        return self._pairs[index]

    def sample(self, batch_size: int, generator: torch.Generator, lo: int = 0,
               hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw a global batch of ``batch_size`` and return its rows ``[lo, hi)`` as
        ``(lr, hr)``: ``(hi−lo)×C×p×p`` and ``(hi−lo)×C×ps×ps``."""
        hi = batch_size if hi is None else hi
        which = torch.randint(len(self.usable), (batch_size,), generator=generator)
        corners = torch.rand(batch_size, 2, generator=generator, dtype=torch.float64)
        flips = torch.randint(2, (batch_size, 3), generator=generator)
        p, s = self.patch, self.scale
        lrs, hrs = [], []
        for row in range(lo, hi):
            index = self.usable[int(which[row])]
            lr_image, hr_image = self.pair(index)
            height, width = lr_image.shape[:2]
            top = min(int(corners[row, 0] * (height - p + 1)), height - p)
            left = min(int(corners[row, 1] * (width - p + 1)), width - p)
            lr = _channels_first(lr_image[top:top + p, left:left + p], self.color)
            hr = _channels_first(hr_image[top * s:(top + p) * s, left * s:(left + p) * s],
                                 self.color)
            if self.augment:
                lr, hr = _augment(lr, hr, flips[row].tolist())
            lrs.append(lr)
            hrs.append(hr)
        return torch.stack(lrs), torch.stack(hrs)


def _augment(lr: torch.Tensor, hr: torch.Tensor, bits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same flip/flip/transpose on both (C×H×W)."""
    if bits[0]:
        lr, hr = lr.flip(-1), hr.flip(-1)
    if bits[1]:
        lr, hr = lr.flip(-2), hr.flip(-2)
    if bits[2]:
        lr, hr = lr.transpose(-1, -2), hr.transpose(-1, -2)
    return lr.contiguous(), hr.contiguous()
