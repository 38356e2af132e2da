"""Conversions between uint8 images and model tensors.

RGB models take ``1×3×H×W`` float32 in [0, 1]; Y-channel models (FSRCNN) take ``1×1×H×W`` BT.601
luma / 255, and their output is recombined with bicubic-upscaled chroma through
``rgb_to_ycbcr`` / ``ycbcr_to_rgb`` (studio swing: Y in 16..235, Cb/Cr in 16..240, float64 on the
0..255 scale, same luma as :func:`fxquant.metrics.rgb_to_y`).
"""

from __future__ import annotations

import numpy as np
import torch

from fxquant.metrics import rgb_to_y

__all__ = ["to_tensor", "to_uint8", "rgb_to_ycbcr", "ycbcr_to_rgb", "to_y_tensor"]

# Rows give Y, Cb, Cr from 0..255 RGB (MATLAB rgb2ycbcr coefficients expressed over 256).
_RGB_TO_YCBCR = np.array([
    [65.738, 129.057, 25.064],
    [-37.945, -74.494, 112.439],
    [112.439, -94.154, -18.285],
]) / 256.0
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)


def _check_hwc(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {img.shape}")
    return img


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB → float32 ``1×3×H×W`` in [0, 1]."""
    img = _check_hwc(img)
    if img.dtype != np.uint8:
        raise ValueError(f"to_tensor expects a uint8 image, got {img.dtype}")
    chw = np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32) / 255.0
    return torch.from_numpy(chw).unsqueeze(0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Model output in [0, 1] → uint8: clamp, ×255, round half to even (``torch.round``).

    Accepts ``1×C×H×W`` or ``C×H×W``; C=3 gives H×W×3, C=1 gives an H×W plane.
    """
    t = tensor.detach().to("cpu", torch.float32)
    if t.dim() == 4:
        if t.shape[0] != 1:
            raise ValueError(f"to_uint8 converts one image, got a batch of shape {tuple(t.shape)}")
        t = t[0]
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"to_uint8 expects 1×C×H×W or C×H×W with C in (1, 3), "
                         f"got shape {tuple(tensor.shape)}")
    values = torch.round(t.clamp(0.0, 1.0) * 255.0).to(torch.uint8).numpy()
    return values[0] if values.shape[0] == 1 else np.ascontiguousarray(values.transpose(1, 2, 0))


def rgb_to_ycbcr(img: np.ndarray) -> np.ndarray:
    """0..255 RGB (uint8 or float) H×W×3 → float64 YCbCr H×W×3 (BT.601, studio swing)."""
    img = _check_hwc(img).astype(np.float64)
    return img @ _RGB_TO_YCBCR.T + _YCBCR_OFFSET


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`: float64 RGB H×W×3 on 0..255, not clipped or rounded."""
    ycbcr = _check_hwc(ycbcr).astype(np.float64)
    return (ycbcr - _YCBCR_OFFSET) @ _YCBCR_TO_RGB.T


def to_y_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 H×W×3 RGB → float32 ``1×1×H×W`` holding BT.601 Y / 255 (Y in 16/255..235/255)."""
    y = rgb_to_y(_check_hwc(img)) / 255.0
    return torch.from_numpy(y.astype(np.float32))[None, None]
