"""Normalising and validating calibration data before it reaches the graph."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from fxquant.errors import CalibrationError


def is_map_style(calib: object) -> bool:
    """A source of batches read by index (``len`` and ``[i]``, e.g. a torch ``Dataset`` of
    batches or :class:`fxquant.data.CalibrationPatches`): streamed, never held whole."""
    return (hasattr(calib, "__len__") and hasattr(calib, "__getitem__")
            and not isinstance(calib, (torch.Tensor, list, tuple, str, bytes, dict)))


def _as_tuple(item: object, index: int) -> tuple[torch.Tensor, ...]:
    if isinstance(item, torch.Tensor):
        return (item,)
    if isinstance(item, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in item):
        return tuple(item)
    hint = ""
    if isinstance(item, dict):  # BasicSR-style loaders yield {"lq": ..., "gt": ...}
        key = next((k for k in ("lq", "lr", "input", "img") if k in item), next(iter(item), "lq"))
        hint = (f" (keys: {', '.join(map(str, item))}); give the model's input alone, e.g. "
                f"[batch[{key!r}] for batch in loader]")
    elif type(item).__module__ == "numpy":
        hint = "; convert it with torch.from_numpy (N×C×H×W float32)"
    raise CalibrationError(f"calibration batch {index} is a {type(item).__name__}; expected a "
                           f"tensor or a tuple of tensors{hint}")


def _check_batch(batch: tuple[torch.Tensor, ...], index: int) -> None:
    for tensor in batch:
        if tensor.numel() == 0:
            raise CalibrationError(f"calibration batch {index} is empty "
                                   f"(shape {tuple(tensor.shape)})")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CalibrationError(f"calibration batch {index} contains {bad} NaN/inf "
                                   "values; calibration data must be finite")


class LazyBatches(Sequence):
    """The batches of a map-style source, loaded and checked one at a time when read (float32,
    as argument tuples): passes iterate, index and slice it like a list, and only the batch in
    use is in memory. A slice is a view on the same source."""

    def __init__(self, source: object, indices: range | None = None):
        self.source = source
        self.indices = range(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return LazyBatches(self.source, self.indices[index])
        position = self.indices[index]
        batch = tuple(_as_float(t, f"calibration batch {position}")
                      for t in _as_tuple(self.source[position], position))
        _check_batch(batch, position)
        return batch


def as_batches(calib: object, batch_size: int = 8) -> Sequence[tuple[torch.Tensor, ...]]:
    """Turn a tensor (split along dim 0), an iterable of tensors / argument tuples, or a
    map-style source of batches (streamed: :class:`LazyBatches`) into a sequence of argument
    tuples; reject empty or non-finite data with the batch that is wrong."""
    if calib is None:
        raise CalibrationError("no calibration data: pass calib= (a N×C×H×W tensor, an "
                               "iterable of batches, or a map-style source of batches)")
    if isinstance(calib, LazyBatches):
        return calib
    if is_map_style(calib):
        if len(calib) == 0:
            raise CalibrationError("calibration data is empty: give at least one batch")
        return LazyBatches(calib)
    if isinstance(calib, torch.Tensor):
        if calib.ndim == 0 or calib.shape[0] == 0 or calib.numel() == 0:
            raise CalibrationError(f"calibration tensor is empty (shape {tuple(calib.shape)}); "
                                   "give at least one sample")
        batches = [(chunk,) for chunk in calib.split(batch_size)]
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        batches = [_as_tuple(item, index) for index, item in enumerate(calib)]
        if not batches:
            raise CalibrationError("calibration data is empty: give at least one batch")
    else:
        raise CalibrationError(f"calibration data must be a tensor or an iterable of batches, "
                               f"got {type(calib).__name__}")
    for index, batch in enumerate(batches):
        _check_batch(batch, index)
    return batches


# Batches of a streamed source that prepare_calibration reads for its checks.
STREAM_CHECK_BATCHES = 8

# Smallest patch side accepted: a 3×3 conv on a smaller patch sees mostly zero padding, so the
# ranges it yields describe the padding, not images.
MIN_PATCH_SIDE = 3
# Below this side the statistics come from few pixels per patch: accepted with a warning.
SMALL_PATCH_SIDE = 8


def _as_float(tensor: torch.Tensor, where: str) -> torch.Tensor:
    if tensor.is_meta:
        raise CalibrationError(f"{where} is a meta tensor (a shape without data); give real "
                               "image data")
    tensor = tensor.detach()  # data, not part of a graph: no gradient is taken through it
    if tensor.is_floating_point():
        return tensor if tensor.dtype == torch.float32 else tensor.float()
    raise CalibrationError(f"{where} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                           "calibration data must be floating point in the model's input range "
                           "(for 8-bit images: x.float() / 255 for a model taking [0, 1])")


def prepare_calibration(calib: object, input_range: tuple[float, float] | None = (0.0, 1.0)
                        ) -> object:
    """Calibration data as every pass can read it, checked once before compiling.

    A generator or iterator is materialized into a list (several passes read the data, a
    generator only once); a map-style source (``len`` and ``[i]``) is streamed instead: it
    becomes :class:`LazyBatches` and the checks below read its first
    ``STREAM_CHECK_BATCHES`` batches. float16/float64 tensors become float32; integer
    tensors, values far outside ``input_range`` (0..255 images for a [0, 1] model), constant
    data and patches too small for a 3×3 conv are errors naming what is wrong;
    ``input_range=None`` skips the range check (a model with normalised inputs).
    """
    import warnings

    if input_range is not None and not (len(input_range) == 2 and
                                        float(input_range[0]) < float(input_range[1])):
        raise CalibrationError(f"input_range must be (low, high) with low < high, got "
                               f"{tuple(input_range)}; (0, 1) for the zoo's models, (0, 255) for "
                               "a model taking 8-bit values, None for normalised inputs")
    if calib is None:
        return None
    if isinstance(calib, LazyBatches) or is_map_style(calib):
        prepared: object = as_batches(calib)
        images = [batch[0] for batch in prepared[:STREAM_CHECK_BATCHES]]
    elif isinstance(calib, torch.Tensor):
        prepared: object = _as_float(calib, "the calibration tensor")
    elif isinstance(calib, Iterable) and not isinstance(calib, (str, bytes)):
        items = list(calib)  # materialize once: a generator cannot be read by each pass
        prepared = [_as_float(item, f"calibration batch {i}") if isinstance(item, torch.Tensor)
                    else tuple(_as_float(t, f"calibration batch {i}")
                               if isinstance(t, torch.Tensor) else t for t in item)
                    if isinstance(item, (tuple, list)) else item
                    for i, item in enumerate(items)]
    else:
        prepared = calib
    if not isinstance(prepared, LazyBatches):
        images = [batch[0] for batch in as_batches(prepared)]  # the first argument is the image
    for index, image in enumerate(images):
        if image.ndim == 3:  # the usual slip: a dataset of single images, not of batches
            raise CalibrationError(
                f"calibration batch {index} has shape {tuple(image.shape)}, one C×H×W image; "
                "batches are N×C×H×W: stack the images (torch.stack), or batch a dataset of "
                "images with torch.utils.data.DataLoader(dataset, batch_size=8)")
    lo = min(float(t.min()) for t in images)
    hi = max(float(t.max()) for t in images)
    if lo == hi:
        raise CalibrationError(f"calibration data is constant (every value is {lo:g}): ranges "
                               "calibrated on it are degenerate; use real image patches")
    if input_range is not None:
        a, b = input_range
        margin = 0.5 * (b - a)
        if hi > b + margin or lo < a - margin:
            raise CalibrationError(
                f"calibration data spans [{lo:g}, {hi:g}] but the model's inputs lie in "
                f"[{a:g}, {b:g}] (input_range); rescale it (0..255 images: divide by 255) or "
                "pass the model's real input_range (None for normalised inputs)")
    sides = [min(t.shape[-2:]) for t in images if t.ndim == 4]
    if sides and min(sides) < MIN_PATCH_SIDE:
        raise CalibrationError(f"calibration patches are {min(sides)} pixels on a side; give "
                               f"patches of at least {SMALL_PATCH_SIDE}×{SMALL_PATCH_SIDE} "
                               "(the zoo default is 48×48)")
    if sides and min(sides) < SMALL_PATCH_SIDE:
        warnings.warn(f"calibration patches are only {min(sides)} pixels on a side: ranges come "
                      f"mostly from zero padding at the borders; {SMALL_PATCH_SIDE}×"
                      f"{SMALL_PATCH_SIDE} or larger (48×48 by default) calibrates better",
                      stacklevel=3)
    return prepared
