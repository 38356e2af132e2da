"""Running an SR model over a benchmark set and scoring it (PSNR/SSIM on Y, ``scale`` shaved)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from fxquant.data import BenchmarkSet, to_tensor, to_uint8, to_y_tensor
from fxquant.errors import DataError
from fxquant.metrics import SSIM_WINDOW, psnr_y, rgb_to_y, ssim_y

SRFunction = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ImageScore:
    name: str
    psnr: float
    ssim: float


@dataclass
class SetScore:
    dataset: str
    psnr: float
    ssim: float
    images: list[ImageScore] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def super_resolve(model: SRFunction, lr: np.ndarray, color: str) -> np.ndarray:
    """SR output as the evaluation protocol sees it: uint8 RGB for RGB models, the rounded
    0..255 Y plane (float64) for Y-channel models."""
    with torch.inference_mode():
        if color == "y":
            out = model(to_y_tensor(lr))
            return torch.clamp(out[0, 0].double() * 255.0, 0, 255).round().numpy()
        return to_uint8(model(to_tensor(lr)))


def score_image(sr: np.ndarray, hr: np.ndarray, scale: int) -> tuple[float, float]:
    if sr.ndim == 2:  # Y-only model: compare with the HR luma plane
        hr = rgb_to_y(hr)
    return psnr_y(sr, hr, scale), ssim_y(sr, hr, scale)


def evaluate(model: SRFunction, dataset: BenchmarkSet, color: str, *,
             progress: bool = False, label: str = "") -> SetScore:
    """Mean PSNR/SSIM of ``model`` (a callable on a 1×C×h×w tensor) over ``dataset``."""
    images = []
    need = 2 * dataset.scale + SSIM_WINDOW  # shaved borders, then one SSIM window
    for pair in tqdm(dataset, desc=label or dataset.name, disable=not progress, leave=False):
        if min(pair.hr.shape[:2]) < need:
            raise DataError(f"{dataset.name} image '{pair.name}' is {pair.hr.shape[0]}×"
                            f"{pair.hr.shape[1]} (HR, cropped to a multiple of {dataset.scale}): "
                            f"too small for x{dataset.scale} scoring, which shaves "
                            f"{dataset.scale} pixels per border and needs an {SSIM_WINDOW}×"
                            f"{SSIM_WINDOW} SSIM window; HR images must be at least {need}×{need}")
        psnr, ssim = score_image(super_resolve(model, pair.lr, color), pair.hr, dataset.scale)
        images.append(ImageScore(pair.name, psnr, ssim))
    return SetScore(dataset.name, float(np.mean([i.psnr for i in images])),
                    float(np.mean([i.ssim for i in images])), images)
