"""SR benchmark sets: (LR, HR) pairs under ``<root>/benchmark/<Set>``.

HR images are ``<Set>/HR/*.png`` in file-name order, cropped to a multiple of the scale. LR images
come from ``<Set>/LR_bicubic/X<s>/`` when that folder exists, named ``<stem>x<s>.png``
(EDSR-PyTorch, as in the shipped Set5) or ``<stem>.png`` (DAQ); otherwise they are generated with
the MATLAB-compatible :func:`bicubic_downscale`, which reproduces the shipped files exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from fxquant.data.images import load_image
from fxquant.data.imresize import bicubic_downscale, mod_crop
from fxquant.errors import DataError
from fxquant.paths import data_root

__all__ = ["BENCHMARK_SETS", "BenchmarkSet", "SRPair", "check_sets", "hr_folder", "list_images"]

BENCHMARK_SETS = ("Set5", "Set14", "B100", "Urban100")

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg")


class SRPair(NamedTuple):
    """One benchmark image: its file stem, the LR input and the mod-cropped HR target."""

    name: str
    lr: np.ndarray
    hr: np.ndarray


def list_images(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files directly in ``folder``, sorted by file name."""
    try:
        return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes),
                      key=lambda p: p.name)
    except OSError as exc:  # permissions, a vanished folder
        raise DataError(f"cannot list images in {folder}: {exc.strerror or exc}; the folder must "
                        "be readable") from None


def hr_folder(group: str, name: str, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<group>/<name>/HR``, or :class:`DataError` listing the sets that exist."""
    base = data_root(root) / group
    folder = base / name / "HR"
    if not folder.is_dir():
        existing = sorted(p.name for p in base.iterdir() if (p / "HR").is_dir()) \
            if base.is_dir() else []
        available = ", ".join(existing) if existing else "none"
        raise DataError(f"{group} set '{name}' not found: expected a folder {folder} "
                        f"holding HR images; sets present under {base}: {available}")
    return folder


def check_sets(group: str, names: Sequence[str], root: str | os.PathLike | None = None) -> None:
    """Each of ``names`` exists under ``<root>/<group>`` (:func:`hr_folder`'s error otherwise):
    checked by the commands before they compile, which can take minutes."""
    for name in names:
        hr_folder(group, name, root)


class BenchmarkSet:
    """Iterable of :class:`SRPair` for one benchmark set at one integer scale."""

    def __init__(self, name: str, scale: int, root: str | os.PathLike | None = None,
                 limit: int | None = None):
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise DataError(f"scale must be a positive int, got {scale!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 1):
            raise DataError(f"limit must be a positive int or None, got {limit!r}")
        self.name = name
        self.scale = scale
        folder = hr_folder("benchmark", name, root)
        self.hr_paths = list_images(folder, (".png",))[:limit]
        if not self.hr_paths:
            raise DataError(f"benchmark set '{name}' has no PNG images in {folder}")
        lr_folder = folder.parent / "LR_bicubic" / f"X{scale}"
        self.lr_folder = lr_folder if lr_folder.is_dir() else None

    def __len__(self) -> int:
        return len(self.hr_paths)

    def __iter__(self) -> Iterator[SRPair]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> SRPair:
        hr_path = self.hr_paths[index]
        hr = mod_crop(load_image(hr_path), self.scale)
        lr = self._stored_lr(hr_path) if self.lr_folder else bicubic_downscale(hr, self.scale)
        expected = (hr.shape[0] // self.scale, hr.shape[1] // self.scale, 3)
        if lr.shape != expected:
            raise DataError(f"LR image for {hr_path.stem} in {self.lr_folder} has shape "
                            f"{lr.shape}; expected {expected} (mod-{self.scale} HR "
                            f"{hr.shape} divided by {self.scale})")
        return SRPair(hr_path.stem, lr, hr)

    def _stored_lr(self, hr_path: Path) -> np.ndarray:
        candidates = [self.lr_folder / f"{hr_path.stem}x{self.scale}{hr_path.suffix}",
                      self.lr_folder / hr_path.name]
        for candidate in candidates:
            if candidate.is_file():
                return load_image(candidate)
        tried = " or ".join(str(c) for c in candidates)
        raise DataError(f"LR image for {hr_path.name} missing: expected {tried}")

    def __repr__(self) -> str:
        source = self.lr_folder or "generated bicubic"
        return f"BenchmarkSet({self.name!r}, x{self.scale}, {len(self)} images, LR: {source})"
