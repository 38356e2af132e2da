"""Normalising and validating calibration data before it reaches the graph."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fxquant.errors import CalibrationError


def as_batches(calib: object, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Turn a tensor (split along dim 0), or an iterable of tensors / argument tuples, into a
    list of argument tuples; reject empty or non-finite data with the batch that is wrong."""
    if calib is None:
        raise CalibrationError("no calibration data: pass calib= (a N×C×H×W tensor or an "
                               "iterable of batches)")
    if isinstance(calib, torch.Tensor):
        if calib.ndim == 0 or calib.shape[0] == 0 or calib.numel() == 0:
            raise CalibrationError(f"calibration tensor is empty (shape {tuple(calib.shape)}); "
                                   "give at least one sample")
        batches = [(chunk,) for chunk in calib.split(batch_size)]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = []
        for item in calib:
            if isinstance(item, torch.Tensor):
                batches.append((item,))
            elif isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
                batches.append(tuple(item))
            else:
                raise CalibrationError(f"calibration batch {len(batches)} is a "
                                       f"{type(item).__name__}; expected a tensor or a tuple of tensors")
        if not batches:
            raise CalibrationError("calibration data is empty: give at least one batch")
    else:
        raise CalibrationError(f"calibration data must be a tensor or an iterable of batches, "
                               f"got {type(calib).__name__}")
    for index, batch in enumerate(batches):
        for tensor in batch:
            if tensor.numel() == 0:
                raise CalibrationError(f"calibration batch {index} is empty "
                                       f"(shape {tuple(tensor.shape)})")
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CalibrationError(f"calibration batch {index} contains {bad} NaN/inf "
                                       "values; calibration data must be finite")
    return batches
