"""Static clipping ranges from calibration histograms: percentile and MSE-optimal search."""

from __future__ import annotations

import torch

from fxquant.quant.uniform import affine_qparams, unsigned_range


def percentile_range(hist: torch.Tensor, lo: float, hi: float,
                     percentile: float) -> tuple[float, float]:
    """The ``100-p`` and ``p`` percentiles of a histogram over ``[lo, hi]`` (bin-edge accurate)."""
    cdf = torch.cumsum(hist, 0) / hist.sum()
    edges = torch.linspace(lo, hi, len(hist) + 1, dtype=torch.float64)
    low_q, high_q = (100.0 - percentile) / 100.0, percentile / 100.0
    low_idx = int(torch.searchsorted(cdf, torch.tensor(low_q, dtype=cdf.dtype)))
    high_idx = int(torch.searchsorted(cdf, torch.tensor(high_q, dtype=cdf.dtype)))
    return float(edges[min(low_idx, len(hist))]), float(edges[min(high_idx + 1, len(hist))])


def quantization_mse(values: torch.Tensor, weights: torch.Tensor, lows: torch.Tensor,
                     highs: torch.Tensor, bits: int) -> torch.Tensor:
    """Weighted squared error of quantizing ``values`` with each candidate range [lo_i, hi_i]."""
    scale, zero_point = affine_qparams(lows, highs, bits)
    scale, zero_point = scale.double()[:, None], zero_point.double()[:, None]
    qmin, qmax = unsigned_range(bits)
    q = torch.clamp(torch.round(values[None, :] / scale) + zero_point, qmin, qmax)
    err = (q - zero_point) * scale - values[None, :]
    return (err * err * weights[None, :]).sum(dim=1)


def channel_mse_ranges(samples: torch.Tensor, lows: torch.Tensor, highs: torch.Tensor,
                       bits: int, steps: int = 48, bins: int = 2048
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the clip range minimising the quantization MSE of its samples (C × s),
    searched as :func:`mse_range` does over a ``bins``-bin histogram of the samples spanning
    the channel's observed ``[low, high]`` (the true extremes, which a sample may miss, are
    counted too). The histogram makes the search cost independent of the sample size."""
    out_lo, out_hi = lows.clone().double(), highs.clone().double()
    for c in range(samples.shape[0]):
        lo, hi = float(lows[c]), float(highs[c])
        if not hi > lo:
            continue  # a constant channel: its min/max range is exact
        values = torch.cat([samples[c].double(), lows[c:c + 1].double(), highs[c:c + 1].double()])
        hist = torch.histc(values, bins=bins, min=lo, max=hi)
        centres = lo + (hi - lo) / bins * (torch.arange(bins, dtype=torch.float64) + 0.5)
        out_lo[c], out_hi[c] = mse_range(hist, centres, bits, steps)
    return out_lo, out_hi


def mse_range(hist: torch.Tensor, centres: torch.Tensor, bits: int,
              steps: int = 48) -> tuple[float, float]:
    """Clip range minimising the expected quantization MSE of the histogram.

    A grid over the fraction kept on each side (``lo·a``, ``hi·b`` for a, b in (0, 1]) is
    searched exhaustively; each bin is represented by its centre.
    """
    keep = hist > 0
    values, weights = centres[keep].double(), hist[keep].double()
    lo, hi = float(values.min()), float(values.max())
    fractions = torch.linspace(1.0 / steps, 1.0, steps, dtype=torch.float64)
    lows = (min(lo, 0.0) * fractions)[:, None].expand(steps, steps).reshape(-1)
    highs = (max(hi, 0.0) * fractions)[None, :].expand(steps, steps).reshape(-1)
    if lo >= 0.0:  # one-sided data: only the upper end needs searching
        lows, highs = torch.zeros(steps, dtype=torch.float64), max(hi, 0.0) * fractions
    elif hi <= 0.0:
        lows, highs = min(lo, 0.0) * fractions, torch.zeros(steps, dtype=torch.float64)
    errors = torch.cat([quantization_mse(values, weights, lows[i:i + 256], highs[i:i + 256], bits)
                        for i in range(0, len(lows), 256)])
    best = int(torch.argmin(errors))
    return float(lows[best]), float(highs[best])
