"""MATLAB-compatible bicubic ``imresize``.

Reproduces MATLAB's ``imresize(img, scale, 'bicubic')`` (Image Processing Toolbox), which is how the
standard SR benchmark LR images were made:

* cubic kernel with a = -0.5; when downscaling, the kernel is widened by ``1/scale`` (antialiasing)
  and scaled by ``scale``;
* output pixel ``x`` (1-based) samples input coordinate ``u = x/scale + 0.5*(1 - 1/scale)``;
* each output pixel uses ``ceil(kernel_width) + 2`` taps, weights normalised to sum 1, out-of-range
  indices mirrored (``[1..n, n..1]`` repeated), taps whose weight is zero for every pixel dropped;
* dimensions are resized one at a time in the order of increasing scale (rows first on ties);
* uint8 input is resized in float64 and rounded back to uint8 after each dimension, as MATLAB's
  ``imresizemex`` returns the input class (round half away from zero, saturate to 0..255).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["imresize", "mod_crop", "bicubic_downscale", "bicubic_upscale"]

_CUBIC_SUPPORT = 4.0


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic kernel with a = -0.5, as MATLAB's ``cubic``."""
    absx = np.abs(x)
    absx2 = absx ** 2
    absx3 = absx ** 3
    near = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    far = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return near + far


def _contributions(in_length: int, out_length: int, scale: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices (both ``out_length × taps``) of one resize pass."""
    antialias = scale < 1
    kernel_width = _CUBIC_SUPPORT / scale if antialias else _CUBIC_SUPPORT
    x = np.arange(1, out_length + 1, dtype=np.float64)[:, None]
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left + np.arange(taps, dtype=np.float64)[None, :]
    distance = u - indices
    weights = scale * _cubic(scale * distance) if antialias else _cubic(distance)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, mirror.size)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's double→uint8 conversion: round half away from zero, saturate to 0..255."""
    rounded = np.sign(values) * np.floor(np.abs(values) + 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def _resize_along(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray
                  ) -> np.ndarray:
    """One separable pass; taps are accumulated in order, one vectorised step per tap."""
    shape = [1] * img.ndim
    shape[axis] = weights.shape[0]
    out = np.zeros(img.shape[:axis] + (weights.shape[0],) + img.shape[axis + 1:])
    for tap in range(weights.shape[1]):
        out += weights[:, tap].reshape(shape) * np.take(img, indices[:, tap], axis=axis)
    return out


def imresize(img: np.ndarray, scale: float | None = None,
             output_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Resize an H×W or H×W×C image with MATLAB's bicubic ``imresize``.

    Give ``scale`` (output size ``ceil(scale * size)``, as MATLAB), ``output_shape`` (per-axis
    scale ``out / in``, as MATLAB), or both (the kernel uses ``scale``, the size is
    ``output_shape``). uint8 input gives uint8 output; any other dtype gives float64.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an H×W or H×W×C array, got shape {img.shape}")
    in_shape = img.shape[:2]
    if scale is None and output_shape is None:
        raise ValueError("imresize needs scale or output_shape")
    if scale is not None and scale <= 0:
        raise ValueError(f"imresize scale must be positive, got {scale}")
    if output_shape is None:
        output_shape = tuple(int(math.ceil(scale * n)) for n in in_shape)
    output_shape = tuple(int(n) for n in output_shape)
    if len(output_shape) != 2 or min(output_shape) < 1:
        raise ValueError(f"imresize output_shape must be two positive ints, got {output_shape}")
    scales = ((float(scale), float(scale)) if scale is not None
              else tuple(o / i for o, i in zip(output_shape, in_shape)))

    is_uint8 = img.dtype == np.uint8
    out = img
    for axis in np.argsort(scales, kind="stable"):
        axis = int(axis)
        weights, indices = _contributions(in_shape[axis], output_shape[axis], scales[axis])
        out = _resize_along(out.astype(np.float64), axis, weights, indices)
        if is_uint8:
            out = _round_to_uint8(out)
    return out


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``scale``."""
    height, width = img.shape[:2]
    return img[:height - height % scale, :width - width % scale]


def bicubic_downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """Standard SR LR image: MATLAB bicubic ``imresize(mod_crop(hr, s), 1/s)``."""
    cropped = mod_crop(hr, scale)
    lr_shape = (cropped.shape[0] // scale, cropped.shape[1] // scale)
    return imresize(cropped, scale=1.0 / scale, output_shape=lr_shape)


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic baseline: MATLAB bicubic ``imresize(lr, s)`` to exactly ``s`` times the size."""
    hr_shape = (lr.shape[0] * scale, lr.shape[1] * scale)
    return imresize(lr, scale=float(scale), output_shape=hr_shape)
