"""Image-quality metrics on the BT.601 luma channel, as SR papers report them.

``psnr_y`` follows METHODS.md §2.4 steps 2-4 (the EDSR-PyTorch convention): the RGB difference is
scaled to 0..1, projected on BT.601 luma ``d_Y = (65.738 d_R + 129.057 d_G + 25.064 d_B) / 256``,
``shave`` pixels are cropped from every border, and ``PSNR = -10 log10(mean(d_Y^2))``.

``ssim_y`` is the Gaussian-window SSIM of ``pytorch_msssim.ssim(X, Y, data_range=255,
win_size=11, win_sigma=1.5, K=(0.01, 0.03))`` ('valid' filtering, mean of the SSIM map) on the
shaved Y channel (0..255 scale).

Both take uint8 (or 0..255 float) H×W×3 RGB images, or H×W Y planes on the 0..255 scale (for
Y-channel models and greyscale images).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["rgb_to_y", "psnr_y", "ssim_y"]

# BT.601 studio-swing luma weights on 0..255 RGB, as in EDSR-PyTorch and MATLAB's rgb2ycbcr.
_LUMA_WEIGHTS = np.array([65.738, 129.057, 25.064]) / 256.0
_LUMA_OFFSET = 16.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
SSIM_DATA_RANGE = 255.0


def _check_rgb(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{what} must be an H×W×3 RGB array, got shape {img.shape}")
    return img


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma ``16 + (65.738 R + 129.057 G + 25.064 B) / 256`` of 0..255 RGB, float64 H×W."""
    img = _check_rgb(img, "rgb_to_y input").astype(np.float64)
    return _LUMA_OFFSET + img @ _LUMA_WEIGHTS


def _as_pair(sr: np.ndarray, hr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sr, hr = np.asarray(sr), np.asarray(hr)
    if sr.shape != hr.shape:
        raise ValueError(f"sr and hr shapes differ: sr {sr.shape} vs hr {hr.shape}")
    if not (sr.ndim == 2 or (sr.ndim == 3 and sr.shape[2] == 3)):
        raise ValueError(
            f"expected H×W×3 RGB images or H×W Y planes, got shape {sr.shape}")
    return sr.astype(np.float64), hr.astype(np.float64)


def _shave(plane: np.ndarray, shave: int) -> np.ndarray:
    if shave < 0:
        raise ValueError(f"shave must be >= 0, got {shave}")
    height, width = plane.shape[:2]
    if 2 * shave >= height or 2 * shave >= width:
        raise ValueError(f"shave={shave} leaves nothing of a {height}×{width} image")
    return plane[shave:height - shave, shave:width - shave] if shave else plane


def psnr_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """PSNR (dB) on the Y channel after cropping ``shave`` pixels per border; inf if equal."""
    sr, hr = _as_pair(sr, hr)
    diff = (sr - hr) / 255.0
    diff_y = diff @ _LUMA_WEIGHTS if diff.ndim == 3 else diff
    mse = float(np.mean(_shave(diff_y, shave) ** 2))
    if mse == 0.0:
        return float("inf")
    return -10.0 * math.log10(mse)


def _gaussian_window() -> np.ndarray:
    """pytorch_msssim's ``_fspecial_gauss_1d``: centred Gaussian taps normalised to sum 1.

    Computed in float64; pytorch_msssim builds the taps in float32, which moves its SSIM by
    ~1e-6 from this value (far below the 4 decimals papers report).
    """
    coords = np.arange(SSIM_WINDOW, dtype=np.float64) - SSIM_WINDOW // 2
    taps = np.exp(-(coords ** 2) / (2 * SSIM_SIGMA ** 2))
    return taps / taps.sum()


def _filter_valid(plane: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of an H×W plane with ``taps`` along both axes."""
    rows = np.lib.stride_tricks.sliding_window_view(plane, taps.size, axis=0) @ taps
    return np.lib.stride_tricks.sliding_window_view(rows, taps.size, axis=1) @ taps


def ssim_y(sr: np.ndarray, hr: np.ndarray, shave: int) -> float:
    """Gaussian-window SSIM on the Y channel after cropping ``shave`` pixels per border."""
    sr, hr = _as_pair(sr, hr)
    if sr.ndim == 3:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    x, y = _shave(sr, shave), _shave(hr, shave)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels after shaving, "
            f"got {x.shape[0]}×{x.shape[1]}")
    taps = _gaussian_window()
    c1 = (SSIM_K1 * SSIM_DATA_RANGE) ** 2
    c2 = (SSIM_K2 * SSIM_DATA_RANGE) ** 2
    mu_x, mu_y = _filter_valid(x, taps), _filter_valid(y, taps)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = _filter_valid(x * x, taps) - mu_xx
    var_y = _filter_valid(y * y, taps) - mu_yy
    cov_xy = _filter_valid(x * y, taps) - mu_xy
    contrast_structure = (2 * cov_xy + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_xy + c1) / (mu_xx + mu_yy + c1)
    return float(np.mean(luminance * contrast_structure))


def sqnr_db(reference, test) -> float:
    """Signal-to-quantization-noise ratio (dB) of ``test`` against ``reference`` (tensors or
    arrays); inf when they are equal."""
    import torch

    reference = torch.as_tensor(reference, dtype=torch.float64)
    test = torch.as_tensor(test, dtype=torch.float64)
    noise = float((reference - test).pow(2).mean())
    if noise == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(reference.pow(2).mean()) / noise))
