"""Observers: identity modules that record activation statistics during calibration.

The observe pass inserts one in front of every quantized conv input; the calibrate pass runs
data through the graph; the quantize pass turns each observer's statistics into quantizer
parameters and removes it. Observers reject non-finite inputs with the node they sit on.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from fxquant.errors import CalibrationError

HISTOGRAM_BINS = 2048
SAMPLES_PER_CHANNEL = 8192
# Every kind make_activation_observer builds: the recipe's choices plus the method-internal ones.
OBSERVER_KINDS = ("minmax", "percentile", "mse", "moments", "samples")


class Observer(nn.Module):
    """Base observer: ``forward`` returns its input unchanged after recording it."""

    kind = "observer"
    # True for an observer whose observe() takes every value's minimum and maximum and passes
    # them to check_range() before it records anything: min and max propagate NaN and ±inf,
    # so they are finite exactly when every value is, and forward skips its own full-size
    # isfinite pass over the activation
    finite_from_range = False

    def __init__(self, node_name: str = ""):
        super().__init__()
        self.node_name = node_name
        self.batches = 0

    @property
    def has_data(self) -> bool:
        return self.batches > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not self.finite_from_range and not torch.isfinite(x).all():
                raise self.not_finite()
            self.observe(x.detach().float())
        self.batches += 1
        return x

    def not_finite(self) -> CalibrationError:
        return CalibrationError(f"activation at '{self.node_name}' is not finite during "
                                "calibration (NaN or inf): check the calibration data")

    def check_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Raise :meth:`not_finite` unless the observed minima and maxima are finite."""
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise self.not_finite()

    def observe(self, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": "observer", "batches": self.batches}


class MinMaxObserver(Observer):
    """Running min/max over everything (per tensor) or per channel (dim 1)."""

    kind = "minmax"
    finite_from_range = True

    def __init__(self, node_name: str = "", per_channel: bool = False):
        super().__init__(node_name)
        self.per_channel = per_channel
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        if self.per_channel:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)
            lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        else:
            lo, hi = x.min(), x.max()
        self.check_range(lo, hi)
        self.min_val = lo if self.min_val is None else torch.minimum(self.min_val, lo)
        self.max_val = hi if self.max_val is None else torch.maximum(self.max_val, hi)


class HistogramObserver(Observer):
    """Per-tensor histogram over a range that grows as data arrives.

    When a batch falls outside the current range the old counts are re-binned into the
    wider range (each old bin's count placed at its centre), as torch.ao's observer does.
    ``range_method`` (``percentile`` or ``mse``) says how the quantize pass turns the
    histogram into a clipping range.
    """

    kind = "histogram"

    def __init__(self, node_name: str = "", bins: int = HISTOGRAM_BINS,
                 range_method: str = "mse", percentile: float = 99.99):
        super().__init__(node_name)
        self.bins = bins
        self.range_method = range_method
        self.percentile = percentile
        self.hist = torch.zeros(bins, dtype=torch.float64)
        self.lo = self.hi = 0.0
        self.min_val = self.max_val = None

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        self.min_val = lo if self.min_val is None else min(self.min_val, lo)
        self.max_val = hi if self.max_val is None else max(self.max_val, hi)
        if self.batches == 0:
            self.lo, self.hi = lo, hi if hi > lo else lo + 1e-8
        elif lo < self.lo or hi > self.hi:
            new_lo, new_hi = min(lo, self.lo), max(hi, self.hi)
            self.hist = torch.histogram(self.centres(), bins=self.bins, range=(new_lo, new_hi),
                                        weight=self.hist).hist
            self.lo, self.hi = new_lo, new_hi
        self.hist += torch.histogram(x.reshape(-1).double(), bins=self.bins,
                                     range=(self.lo, self.hi)).hist

    def centres(self) -> torch.Tensor:
        width = (self.hi - self.lo) / self.bins
        return self.lo + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)


class MomentsObserver(Observer):
    """Running per-channel mean and variance (over images and pixels), and per-image ones.

    ``image_means``/``image_stds`` keep the per-(image, channel) statistics of every
    calibration image, which the distribution views and channel-sensitivity analyses use.
    """

    kind = "moments"

    def __init__(self, node_name: str = ""):
        super().__init__(node_name)
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sum_sq: torch.Tensor | None = None
        self.image_means: list[torch.Tensor] = []
        self.image_stds: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()
        s, s2 = flat.sum(dim=1), (flat * flat).sum(dim=1)
        self.sum = s if self.sum is None else self.sum + s
        self.sum_sq = s2 if self.sum_sq is None else self.sum_sq + s2
        self.count += flat.shape[1]
        per_image = x.flatten(2)
        self.image_means.append(per_image.mean(dim=2))
        self.image_stds.append(per_image.std(dim=2, unbiased=False))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        return torch.clamp(self.sum_sq / self.count - self.mean ** 2, min=0.0)


def make_activation_observer(method: str, node_name: str, per_channel: bool,
                             percentile: float = 99.99) -> Observer:
    """The observer a recipe's activation ``observer`` setting needs."""
    if method == "minmax":
        return MinMaxObserver(node_name, per_channel=per_channel)
    if method == "mse" and per_channel:  # a random sample of each channel, searched per channel
        from fxquant.quant.subset import SampleObserver  # quant.subset imports this module

        return SampleObserver(node_name, mode="static", max_samples=SAMPLES_PER_CHANNEL,
                              seed=zlib.crc32(node_name.encode()))
    if method in ("percentile", "mse"):
        if per_channel:
            raise CalibrationError(f"observer '{method}' is per tensor only; use 'minmax' "
                                   "or 'mse' for per-channel activations")
        return HistogramObserver(node_name, range_method=method, percentile=percentile)
    if method == "moments":
        return MomentsObserver(node_name)
    if method == "samples":  # raw per-channel samples for fitted level sets (I²NQ)
        from fxquant.quant.subset import SampleObserver  # quant.subset imports this module

        return SampleObserver(node_name, mode="static", max_samples=SAMPLES_PER_CHANNEL,
                              seed=zlib.crc32(node_name.encode()))
    raise CalibrationError(f"unknown observer '{method}'; valid: {', '.join(OBSERVER_KINDS)}")
