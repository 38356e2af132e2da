"""Non-uniform activation levels (I²NQ, docs/methods/i2nq.md): each layer — or each channel —
gets its own sorted level set, dense where its calibration values are dense, and values snap
to the nearest level. Features are never normalized: the levels live in the feature's own
units, so the bell shape of an SR feature map is kept, not rescaled away.

Fitting (:func:`fit_levels`)::

    init      l_i = quantile(x, (i + ½)/L)                      i = 0..L−1, L = 2^b
    refine    repeat: cells between consecutive midpoints; l_i = mean of the values in cell i
              (Lloyd-Max: each step lowers the mean squared error on the samples)
    order     a minimum gap keeps the levels strictly increasing

Integer form: the levels are codes into a table (:class:`~fxquant.quant.base.CodebookCodes`).
For the int8 CPU path the table itself is snapped onto one uint8 grid per layer
(:meth:`NonUniformQuantizer.snap_to_grid`): a b-bit code then stands for a uint8 value, which
the ordinary u8 × int8 convolution consumes with the grid's scale and zero point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fxquant.quant.base import CodebookCodes, Quantizer
from fxquant.quant.subset import midpoints
from fxquant.quant.grid_buckets import bucket_table, half_step_index
from fxquant.quant.table_lookup import lookup

LEVEL_METHODS = ("lloyd-max", "quantile", "uniform")
MIN_GAP = 1e-6  # relative to the channel's range: levels closer than this are pushed apart


COMPARE_LIMIT = 32  # up to this many levels, counting comparisons beats a binary search


def level_index(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of every element of ``x`` (``N × C × ...``) given the sorted
    midpoints between levels (``rows × (L − 1)``, rows 1 or C): the number of midpoints below
    the value, ties going to the lower level. Few levels: one comparison per midpoint,
    counted in uint8 (elementwise and vectorised; ~2× faster than ``searchsorted`` on CPU at
    16 levels); many levels: one batched ``searchsorted``. Both give the same index."""
    count = mids.shape[1]
    mids = mids.to(x.dtype)
    if count >= COMPARE_LIMIT:
        return nearest_index_from_midpoints(x, mids)
    shape = (count, 1, mids.shape[0]) + (1,) * (x.ndim - 2)
    columns = mids.t().reshape(shape)
    index = torch.zeros_like(x, dtype=torch.uint8)
    for k in range(count):
        index += x > columns[k]
    return index.long()


def nearest_index_from_midpoints(x: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    mids = mids.expand(c, -1).unsqueeze(0).expand(n, c, mids.shape[1]).contiguous()
    return torch.searchsorted(mids, x.reshape(n, c, -1).contiguous()).reshape(x.shape)


def gather_levels(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``table[c, index]`` for every element (``table``: C × L); ``torch.gather`` on the
    flattened positions (several times faster than advanced indexing)."""
    n, c = index.shape[:2]
    expanded = table.unsqueeze(0).expand(n, c, table.shape[1])
    return torch.gather(expanded, 2, index.reshape(n, c, -1)).reshape(index.shape)


def _enforce_gap(levels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Sorted, strictly increasing rows: each level at least ``MIN_GAP·range`` above the last."""
    levels = levels.sort(dim=1).values
    gap = (torch.clamp(hi - lo, min=1.0) * MIN_GAP).unsqueeze(1)
    # l'_i = max(l_i, l'_{i-1} + gap)  ⇔  l'_i − i·gap = running max of (l_j − j·gap)
    steps = torch.arange(levels.shape[1], dtype=levels.dtype).unsqueeze(0) * gap
    return torch.cummax(levels - steps, dim=1).values + steps


def _pin(levels: torch.Tensor, pin_zero: torch.Tensor) -> torch.Tensor:
    """Set the level nearest 0 to exactly 0 in the rows where ``pin_zero`` holds."""
    nearest = levels.abs().argmin(dim=1, keepdim=True)
    pinned = levels.scatter(1, nearest, 0.0)
    return torch.where(pin_zero.unsqueeze(1), pinned, levels)


def uniform_levels(samples: torch.Tensor, count: int, ratios: int = 40,
                   pin_zero: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` equally spaced levels per row over the clipped range ``r·[min, max]`` whose
    mean squared error on the samples is least (r from 1 down to 0.2): the uniform baseline
    with everything else — granularity, data, weights — equal."""
    lo, hi = samples.amin(1), samples.amax(1)
    if pin_zero is not None:  # a non-negative input keeps 0 as its lowest level
        lo = torch.where(pin_zero, torch.zeros_like(lo), lo)
    best, best_err = None, None
    steps = torch.linspace(0, 1, count, dtype=samples.dtype)
    for r in torch.linspace(1.0, 0.2, ratios).tolist():
        levels = _enforce_gap((lo * r).unsqueeze(1) + ((hi - lo) * r).unsqueeze(1) * steps, lo, hi)
        err = (snap(samples, levels) - samples).pow(2).mean(1)
        if best is None:
            best, best_err = levels, err
        else:
            better = err < best_err
            best = torch.where(better.unsqueeze(1), levels, best)
            best_err = torch.minimum(err, best_err)
    return best


def snap(samples: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each row of ``samples`` (``R × S``) snapped to the nearest of its row's levels."""
    index = torch.searchsorted(midpoints(levels).contiguous(), samples.contiguous())
    return torch.gather(levels, 1, index)


def fit_levels(samples: torch.Tensor, count: int, *, method: str = "lloyd-max",
               iters: int = 100, tol: float = 1e-5,
               pin_zero: torch.Tensor | bool = False) -> torch.Tensor:
    """``count`` sorted, strictly increasing levels per row of ``samples`` (``R × S``).

    ``quantile``: the (i + ½)/count quantiles; ``lloyd-max``: those, refined by Lloyd-Max
    iterations until no level moves more than ``tol``·range; ``uniform``: equally spaced over
    the MSE-best clipped range. ``pin_zero`` (per row) fixes one level at exactly 0 (inputs
    after a ReLU: the mass at 0 is quantized without error). Deterministic: no random init.
    """
    if method not in LEVEL_METHODS:
        raise ValueError(f"level method '{method}' unknown; choose one of {', '.join(LEVEL_METHODS)}")
    samples = samples.detach().double()
    rows = samples.shape[0]
    pin = torch.as_tensor(pin_zero, dtype=torch.bool).expand(rows)
    lo, hi = samples.amin(1), samples.amax(1)
    if method == "uniform":
        return uniform_levels(samples, count, pin_zero=pin).float()
    probs = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    levels = _enforce_gap(_pin(torch.quantile(samples, probs, dim=1).t(), pin), lo, hi)
    if method == "lloyd-max":
        ordered = samples.sort(dim=1).values.contiguous()
        span = torch.clamp(hi - lo, min=1e-12)
        for _ in range(iters):
            sums, counts = _cell_sums(ordered, levels)
            # an empty cell keeps its level: it still splits its neighbours' cells
            new = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
            new = _enforce_gap(_pin(new, pin), lo, hi)
            moved = ((new - levels).abs().amax(1) / span).max()
            levels = new
            if moved <= tol:
                break
    return levels.float()


def _cell_sums(ordered: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sum and the count of the sorted samples ``ordered`` (``R × S``) nearest
    each level (cell i: ``mid_{i−1} < x <= mid_i``, ties to the lower level, as
    :func:`level_index`).

    The samples are sorted, so each cell is a run of them: its ends are a search of the
    ``L − 1`` midpoints in the samples, and its sum adds the run from left to right, the
    order in which a ``scatter_add_`` over the samples' cell indices adds them, so the sums
    are the same bit for bit (tests/quant/test_nonuniform.py). CARN-M's level fitting took
    6.9 s instead of 21.3 (docs/performance.md, "Calibration, level fitting and FSWA in half
    the time")."""
    rows, size = ordered.shape
    ends = torch.searchsorted(ordered, midpoints(levels).contiguous(), right=True)
    bounds = torch.cat([ends.new_zeros(rows, 1), ends, ends.new_full((rows, 1), size)], 1)
    counts = bounds.diff(dim=1)
    sums = torch.segment_reduce(ordered.reshape(-1), "sum", lengths=counts.reshape(-1))
    return sums.view(rows, -1), counts.to(ordered.dtype)


@dataclass
class IntegerGrid:
    """The uint8 grid a snapped level table lives on: ``value = (code − zero_point)·scale``."""

    bits: int
    scale: torch.Tensor
    zero_point: torch.Tensor


def grid_codes(levels: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round every row of a level table onto one shared ``bits``-bit grid spanning all rows
    (and 0, so that zero padding stays exact); codes that collide within a row are pushed
    apart one grid step at a time, so each row stays strictly increasing (needs
    ``levels per row <= 2^bits``). Returns (codes ``R × L`` int64, scale, zero point)."""
    qmax = 2 ** bits - 1
    count = levels.shape[1]
    if count > qmax + 1:
        raise ValueError(f"{count} levels do not fit on a {bits}-bit grid of {qmax + 1} codes")
    levels = levels.detach().double()
    lo, hi = min(float(levels.min()), 0.0), max(float(levels.max()), 0.0)
    scale = max(hi - lo, 1e-12) / qmax
    zero_point = round(-lo / scale)
    codes = torch.clamp(torch.round(levels / scale) + zero_point, 0, qmax).long()
    steps = torch.arange(count).unsqueeze(0)
    codes = torch.cummax(codes - steps, dim=1).values + steps  # c_i >= c_{i-1} + 1
    top = qmax - (count - 1) + steps  # ... and room above for the rest: c_i <= qmax − (L−1−i)
    codes = torch.minimum(codes, top)
    return codes, torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point)


class ClippedStraightThrough(torch.autograd.Function):
    """``q`` forward; backward, ``q``'s gradient passes unchanged (to the levels it was
    looked up from) and ``x`` gets it where ``lo <= x <= hi`` (0 outside: the clipping bound).

    The same gradients as ``q + (x − x.detach())·inside``, without its three full-size
    arithmetic passes and the float copies of the bool mask that CPU type promotion makes,
    forward and backward (docs/performance.md, "Training step: the clipped straight-through
    gradient")."""

    @staticmethod
    def forward(ctx, x, q, lo, hi):
        inside = (x >= lo) & (x <= hi)
        ctx.save_for_backward(inside)
        return q.view_as(q)  # a new tensor object: autograd attaches this node to it

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        grad_x = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        return grad_x, grad, None, None


def clipped_straight_through(x: torch.Tensor, q: torch.Tensor, lo: torch.Tensor,
                             hi: torch.Tensor) -> torch.Tensor:
    """``q`` with the clipped straight-through gradient to ``x`` (:class:`ClippedStraightThrough`)."""
    return ClippedStraightThrough.apply(x, q, lo, hi)


class NonUniformQuantizer(Quantizer):
    """Static non-uniform quantizer: ``x̂ = l[c, argmin_k |x − l[c, k]|]`` (per tensor: one row).

    ``levels`` (``rows × 2^b``, sorted) is a Parameter, trainable with ``learnable`` (the
    gradient of ``x̂`` reaches the level each value snapped to; the input gets the
    straight-through gradient inside ``[l_0, l_last]``, none outside, as a clipping bound).
    After :meth:`snap_to_grid` the levels are values of one uint8 grid (``grid_bits`` > 0) and
    the quantizer has an int8 lowered form.
    """

    kind = "nonuniform"

    def __init__(self, bits: int, channels: int | None = None, *, learnable: bool = False):
        super().__init__()
        self.bits = bits
        self.channels = channels
        rows = channels or 1
        self.levels = nn.Parameter(torch.linspace(-1, 1, 2 ** bits).repeat(rows, 1),
                                   requires_grad=learnable)
        # grid_bits = 0: free float levels; > 0: snapped onto one uint8 grid (a buffer, so
        # that a loaded model knows which it is)
        self.register_buffer("grid_bits", torch.zeros((), dtype=torch.int64))
        self.register_buffer("grid_levels", torch.zeros(rows, 2 ** bits, dtype=torch.int16))
        self.register_buffer("grid_scale", torch.ones(()))
        self.register_buffer("grid_zero_point", torch.zeros((), dtype=torch.int64))

    @property
    def granularity(self) -> str:
        return "per-channel" if self.channels is not None else "per-tensor"

    def set_levels(self, levels: torch.Tensor) -> None:
        if levels.shape != self.levels.shape:
            raise ValueError(f"levels of shape {tuple(levels.shape)}; this quantizer holds "
                             f"{tuple(self.levels.shape)}")
        with torch.no_grad():
            self.levels.copy_(levels)
            self.grid_bits.zero_()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The levels. Training moves them off a uint8 grid: snap again before lowering."""
        self.levels.requires_grad_(True)
        return [self.levels]

    def tidy(self) -> None:
        """After training: levels sorted and strictly increasing again, and back on their
        uint8 grid when they had one. Levels still on their grid are left alone: deriving
        the grid again from snapped float32 values can move scale and levels by an ulp,
        enough to flip rounding ties (0.03 dB on PAN ×4 Set5)."""
        levels = self.levels.detach()
        grid = int(self.grid_bits)
        if grid and torch.equal(levels, self._grid_values()):
            return
        lo, hi = levels.amin(1), levels.amax(1)
        with torch.no_grad():
            self.levels.copy_(_enforce_gap(levels.double(), lo.double(), hi.double()).float())
        if grid:
            self.snap_to_grid(grid)

    def snap_to_grid(self, bits: int = 8) -> float:
        """Move the levels onto one ``bits``-bit grid (the int8 path's input); returns the
        largest level move in grid steps' units of the old table (≤ 0.5 unless codes collided)."""
        codes, scale, zero_point = grid_codes(self.levels, bits)
        with torch.no_grad():
            self.grid_levels.copy_(codes)
            self.grid_scale.copy_(scale)
            self.grid_zero_point.copy_(zero_point)
            self.grid_bits.fill_(bits)
            snapped = self._grid_values()
            moved = float(((snapped - self.levels.detach()).abs() / scale).max())
            self.levels.copy_(snapped)
        return moved

    def _grid_values(self) -> torch.Tensor:
        """The level values the stored grid stands for (what :meth:`snap_to_grid` sets the
        levels to, and :meth:`tidy` checks them against)."""
        return ((self.grid_levels.long() - self.grid_zero_point) * self.grid_scale.double()).float()

    def integer_grid(self) -> IntegerGrid | None:
        """The uint8 grid of a snapped table, or None when the levels are free floats."""
        if not int(self.grid_bits):
            return None
        return IntegerGrid(int(self.grid_bits), self.grid_scale, self.grid_zero_point)

    def _table(self, channels: int) -> torch.Tensor:
        return self.levels.expand(channels, -1) if self.channels is None else self.levels

    def _buckets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """On a grid: every element's flat bucket index and each bucket's level index (per
        row) — one division, rounding and lookup per element instead of a comparison per
        level. The thresholds are the grid's (after training, until :meth:`tidy`)."""
        bits = int(self.grid_bits)
        if not bits:
            return None
        index = half_step_index(x.detach(), self.grid_scale, self.grid_zero_point, bits,
                                self.levels.shape[0])
        return index, bucket_table(self.grid_levels, bits)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest level of each element (``N × C × ...``); ties go down."""
        buckets = self._buckets(x)
        if buckets is not None:
            return lookup(buckets[1], buckets[0], x)
        return level_index(x.detach(), midpoints(self.levels.detach()))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        table = self._table(x.shape[1])
        buckets = self._buckets(x)
        if buckets is not None:  # one lookup: bucket → level value
            q = lookup(torch.gather(self.levels, 1, buckets[1]), buckets[0], x)
        else:
            q = gather_levels(self.codes(x), table)
        if not (x.requires_grad or self.levels.requires_grad):
            return q
        bounds = (1, -1) + (1,) * (x.ndim - 2)
        return clipped_straight_through(x, q, table[:, 0].view(bounds).detach(),
                                        table[:, -1].view(bounds).detach())

    def integer_codes(self, x: torch.Tensor) -> CodebookCodes:
        return CodebookCodes(self.codes(x).to(torch.int32),
                             self._table(x.shape[1]).detach().to(x.dtype))

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "granularity": self.granularity,
                "mode": "static", "levels": self.levels.shape[1],
                "grid": f"u{int(self.grid_bits)}" if int(self.grid_bits) else "float"}

    def check(self) -> None:
        levels = self.levels.detach()
        if not torch.isfinite(levels).all():
            raise ValueError("non-uniform quantizer has non-finite levels")
        if not bool((levels[:, 1:] > levels[:, :-1]).all()):
            raise ValueError("non-uniform quantizer levels are not strictly increasing")
        grid = self.integer_grid()
        if grid is not None:
            on_grid = ((self.grid_levels.double() - float(grid.zero_point)) * float(grid.scale)).float()
            if not torch.equal(on_grid, levels):
                raise ValueError("non-uniform quantizer levels left their uint8 grid (trained "
                                 "after snapping?); call snap_to_grid() again")
