"""Static range search: percentile and MSE on calibration histograms."""

from __future__ import annotations

import numpy as np
import torch

from fxquant.observers import HistogramObserver
from fxquant.quant.ranges import mse_range, percentile_range, quantization_mse


def _histogram(x: torch.Tensor) -> HistogramObserver:
    observer = HistogramObserver()
    for chunk in x.split(len(x) // 4):
        observer(chunk)
    return observer


def test_percentile_range_matches_numpy_within_a_bin():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    observer = _histogram(x)
    lo, hi = percentile_range(observer.hist, observer.lo, observer.hi, 99.0)
    width = (observer.hi - observer.lo) / observer.bins
    assert abs(lo - np.percentile(x.numpy(), 1.0)) <= 2 * width
    assert abs(hi - np.percentile(x.numpy(), 99.0)) <= 2 * width


def test_mse_range_clips_outliers_and_beats_minmax():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100_000, generator=gen), torch.tensor([40.0, -35.0])])
    observer = _histogram(x)
    lo, hi = mse_range(observer.hist, observer.centres(), bits=4)
    assert -10 < lo < 0 < hi < 10
    err = quantization_mse(x.double(), torch.ones(len(x), dtype=torch.float64),
                           torch.tensor([lo, float(x.min())], dtype=torch.float64),
                           torch.tensor([hi, float(x.max())], dtype=torch.float64), 4)
    assert err[0] < err[1] / 5


def test_mse_range_for_one_sided_data_keeps_zero_floor():
    x = torch.relu(torch.randn(50_000, generator=torch.Generator().manual_seed(2)))
    observer = _histogram(x)
    lo, hi = mse_range(observer.hist, observer.centres(), bits=4)
    assert lo == 0.0 and 0 < hi < float(x.max())
