"""DAQ mixed-precision bit allocation: per-channel bit-widths from the channels' output
errors under an average-bit budget per channel or per MAC, for one conv or for the whole
network from the sensitivity observers of :mod:`fxquant.quant.daq_mixed`
(docs/methods/daq.md §5)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from fxquant.quant.daq_mixed import DAQSensitivityObserver


def channel_sensitivity(errors: torch.Tensor) -> torch.Tensor:
    """Relative sensitivity of each channel: how much of its error the extra bits remove,
    ``E[lowest bits] − E[highest bits]`` (``errors`` is bits-choices × channels)."""
    return errors[0] - errors[-1]


def allocate_bits(errors: torch.Tensor, choices: Sequence[int], avg_bits: float,
                  sensitivity: torch.Tensor | None = None,
                  costs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel bits from ``choices`` (ascending, at most 3) under an average-bit budget.

    Without ``costs`` every channel counts the same and the mean is exactly ``avg_bits``
    (the budget ``floor(avg_bits·C)``, exact when ``avg_bits·C`` is an integer and
    reachable). Channels are ranked by ``sensitivity`` (default
    :func:`channel_sensitivity`) and the allocation is monotone in that rank (a more
    sensitive channel never gets fewer bits): the least sensitive ``n_0`` channels get
    ``choices[0]``, the next ``n_1`` ``choices[1]``... Among the count vectors that meet the
    budget, the one with the smallest estimated error ``Σ_c errors[b_c, c]`` is chosen.

    With ``costs`` (e.g. MACs per channel) the budget is ``Σ_c costs_c·b_c <= avg_bits·Σ costs``
    (met to within one channel's cost), channels are ranked by sensitivity per unit cost,
    and the monotone split with the least estimated error within the budget is chosen.
    """
    choices = [int(b) for b in choices]
    if sorted(set(choices)) != choices:
        raise ValueError(f"bit choices {choices} must be distinct and ascending")
    if not 1 <= len(choices) <= 3:
        raise ValueError(f"give 1 to 3 bit choices, got {choices}")
    errors = errors.double()
    m, c = errors.shape
    if m != len(choices):
        raise ValueError(f"errors has {m} rows for {len(choices)} bit choices")
    if not choices[0] <= avg_bits <= choices[-1]:
        raise ValueError(f"average {avg_bits} is outside the choices {choices}")
    sens = channel_sensitivity(errors) if sensitivity is None else sensitivity.double()
    if costs is not None:
        return _allocate_weighted(errors, choices, avg_bits, sens, costs.double())
    budget = int(math.floor(avg_bits * c + 1e-9))
    order = torch.argsort(sens, stable=True)
    prefix = torch.zeros(m, c + 1, dtype=torch.float64)
    prefix[:, 1:] = torch.cumsum(errors[:, order], dim=1)
    best = None
    for counts in _count_vectors(choices, c, budget):
        bounds = [0]
        for k in counts:
            bounds.append(bounds[-1] + k)
        cost = sum(float(prefix[j, bounds[j + 1]] - prefix[j, bounds[j]]) for j in range(m))
        total = sum(k * b for k, b in zip(counts, choices))
        key = (-total, cost)  # meet the budget as closely as possible, then least error
        if best is None or key < best[0]:
            best = (key, counts)
    if best is None:
        raise ValueError(f"no allocation of {choices} bits reaches an average <= {avg_bits}")
    bits_sorted = torch.cat([torch.full((k,), b, dtype=torch.int64)
                             for k, b in zip(best[1], choices)])
    bits = torch.empty(c, dtype=torch.int64)
    bits[order] = bits_sorted
    return bits


def _allocate_weighted(errors, choices, avg_bits, sens, costs) -> torch.Tensor:
    """Cost-weighted budget: monotone splits ``[0, k1) lo, [k1, k2) mid, [k2, C) hi`` of
    the channels sorted by sensitivity per cost; least estimated error within the budget."""
    if (costs <= 0).any():
        raise ValueError("channel costs must be positive")
    m, c = errors.shape
    order = torch.argsort(sens / costs, stable=True)
    w = torch.zeros(c + 1, dtype=torch.float64)
    w[1:] = torch.cumsum(costs[order], 0)
    budget = avg_bits * float(w[-1]) * (1 + 1e-12)
    prefix = torch.zeros(m, c + 1, dtype=torch.float64)
    prefix[:, 1:] = torch.cumsum(errors[:, order], dim=1)
    lo, hi = choices[0], choices[-1]
    k2 = torch.arange(c + 1)
    if m == 1:
        k1 = torch.zeros(1, dtype=torch.long)
        k2 = torch.zeros(1, dtype=torch.long)
        spent = lo * w[-1:]
    else:
        mid = choices[1] if m == 3 else lo
        if m == 2:  # only lo/hi: k1 = k2
            k1 = k2
        else:  # smallest k1 with lo·W[k1] + mid·(W[k2] − W[k1]) + hi·(W[C] − W[k2]) <= budget
            need = (mid * w[k2] + hi * (w[-1] - w[k2]) - budget) / (mid - lo)
            k1 = torch.clamp(torch.searchsorted(w, need - 1e-9 * float(w[-1])), 0, c)
        spent = lo * w[k1] + mid * (w[k2] - w[k1]) + hi * (w[-1] - w[k2])
    feasible = (k1 <= k2) & (spent <= budget)
    if not feasible.any():
        raise ValueError(f"no allocation of {choices} bits reaches an average <= {avg_bits}")
    if m == 1:
        err = prefix[0, -1:]
    else:
        mid_row = 1 if m == 3 else 0
        err = prefix[0, k1] + (prefix[mid_row, k2] - prefix[mid_row, k1]) \
            + (prefix[m - 1, -1] - prefix[m - 1, k2])
    err = torch.where(feasible, err, torch.full_like(err, float("inf")))
    best = int(torch.argmin(err))
    bounds = (int(k1[best]), int(k2[best]))
    bits_sorted = torch.full((c,), hi, dtype=torch.int64)
    bits_sorted[:bounds[1]] = choices[1] if m == 3 else lo
    bits_sorted[:bounds[0]] = lo
    bits = torch.empty(c, dtype=torch.int64)
    bits[order] = bits_sorted
    return bits


def _count_vectors(choices: list[int], c: int, budget: int):
    """Count vectors (n_0, …) with Σn = c and Σ n_j·b_j <= budget, best (largest) totals:
    for each choice of the free counts, the one determined count is solved for."""
    if len(choices) == 1:
        if choices[0] * c <= budget:
            yield (c,)
        return
    if len(choices) == 2:
        lo, hi = choices
        n_hi = min(c, (budget - lo * c) // (hi - lo))
        if n_hi >= 0:
            yield (c - n_hi, n_hi)
        return
    lo, mid, hi = choices
    for n_hi in range(c + 1):
        rest = budget - lo * c - (hi - lo) * n_hi
        if rest < 0:
            break
        n_mid = min(c - n_hi, rest // (mid - lo))
        yield (c - n_hi - n_mid, n_mid, n_hi)


def allocate_network_bits(per_conv: dict[str, list["DAQSensitivityObserver"]],
                          choices: Sequence[int], avg_bits: float, *, scope: str = "network",
                          weighted: bool = True, budget: str = "mac") -> dict[str, torch.Tensor]:
    """Per-conv per-input-channel bits from each conv's sensitivity observers (one per call).

    ``scope="layer"`` gives each conv the average ``avg_bits``; ``"network"`` spends one joint
    budget over all convs. Downstream-weighted output errors (``weighted``) are in units of
    network-output error already; otherwise each conv's errors are made relative to its
    output energy. ``budget="mac"`` charges a channel by the MACs it feeds, ``"channel"``
    charges every channel alike.
    """
    errors = {t: sum(o.errors for o in group) for t, group in per_conv.items()}
    if scope == "layer":
        return {t: allocate_bits(e, list(choices), avg_bits) for t, e in errors.items()}
    if weighted:
        energy = {t: 1.0 for t in per_conv}
    else:
        energy = {t: max(sum(o.output_energy for o in group), 1e-30)
                  for t, group in per_conv.items()}
    joint = torch.cat([errors[t] / energy[t] for t in per_conv], dim=1)
    costs = None
    if budget == "mac":  # MACs per input channel, summed over the calls
        costs = torch.cat([torch.full((errors[t].shape[1],), float(max(
            sum(o.macs_per_channel for o in group), 1))) for t, group in per_conv.items()])
    bits = allocate_bits(joint, list(choices), avg_bits, costs=costs)
    result, start = {}, 0
    for t in per_conv:
        width = errors[t].shape[1]
        result[t] = bits[start:start + width]
        start += width
    return result
