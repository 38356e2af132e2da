"""DFSQ subset quantization of conv inputs: normalize per channel, snap each value to the
nearest of its channel's 2^b points (a subset of the universal set), de-normalize.

Forward of :class:`SubsetQuantizer` (METHODS.md §3.3)::

    x̃ = normalize(x)                          dynamic: per (image, channel); static: x / s_c
    q = P_c[argmin_k |x̃ − P_c[k]|]             P_c: C × 2^b buffer, sorted
    x̂ = x̃ + stopgrad(q − x̃)                   straight-through estimator
    y = denormalize(x̂)                         dynamic: x̂·(m + eps) [+ μ]; static: x̂·s_c

The lookup is vectorised: midpoints of the sorted points and one batched ``searchsorted`` per
call, never a loop over channels or points. :class:`SampleObserver` records the normalized
calibration values each channel's points are chosen from, as a uniform random sample of
bounded size.
"""

from __future__ import annotations

import torch

from fxquant.observers import Observer
from fxquant.quant.base import (
    CodebookCodes,
    Quantizer,
    StepMultiplierMixin,
    check_multiplier,
)
from fxquant.quant.channel_norm import (
    EPS,
    denormalize,
    dynamic_stats,
    dynamic_stats_minmax,
    normalize,
    static_scale,
)
from fxquant.quant.table_lookup import flat_index, lookup

MODES = ("dynamic", "static")


def midpoints(points: torch.Tensor) -> torch.Tensor:
    """Decision thresholds between consecutive sorted points (last dim)."""
    return (points[..., 1:] + points[..., :-1]) / 2


def nearest_index(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of channel c's points for every element of ``x`` (``N × C × ...``);
    ``points`` is ``C × K`` sorted along K. Ties go to the lower point. (Reference form: one
    batched ``searchsorted`` against each channel's midpoints.)"""
    n, c = x.shape[0], x.shape[1]
    k = points.shape[-1]
    mids = midpoints(points.to(x.dtype)).unsqueeze(0).expand(n, c, k - 1).contiguous()
    return torch.searchsorted(mids, x.reshape(n, c, -1).contiguous())


MAX_GRID_EXPONENT = 16


def grid_exponent(points: torch.Tensor) -> int | None:
    """Smallest s with every midpoint a multiple of 2^-s (official set: 11), or None."""
    mids = midpoints(points.detach().double().cpu())
    for s in range(MAX_GRID_EXPONENT + 1):
        scaled = mids * 2.0 ** s
        if bool((scaled == scaled.round()).all()):
            return s
    return None


def grid_table(points: torch.Tensor, s: int, dtype: torch.dtype = torch.float32,
               values: torch.Tensor | None = None) -> torch.Tensor:
    """``C × (2^(s+1) + 1)`` table: entry ``i + 2^s`` is channel c's nearest point for every x
    with ``ceil(x·2^s) = i``. Every midpoint is a multiple of 2^-s, so the count of midpoints
    below x is the same for all x in ``((i−1)/2^s, i/2^s]``: the table is exact, with ties (x
    on a midpoint) to the lower point, as :func:`nearest_index`. ``values`` (``C × K``, one
    per point; default the points): what the table holds for each nearest point (the lowered
    quantizer's codes, fxquant/lower/subset.py)."""
    mids = midpoints(points.double())
    c = points.shape[0]
    lower = (torch.arange(-2 ** s, 2 ** s + 1, dtype=torch.float64, device=points.device) - 1) / 2 ** s
    index = torch.searchsorted(mids.contiguous(), lower.expand(c, -1).contiguous(), right=True)
    return (points if values is None else values).to(dtype).gather(1, index)


def grid_index(x: torch.Tensor, s: int, width: int) -> torch.Tensor:
    """Flat int32 index into a ``C × width`` :func:`grid_table` for every element of ``x``
    (``N × C × ...``), in ``x``'s memory order: ``ceil(x·2^s)`` clamped to ``±2^s`` (exact:
    2^s is a power of two), plus the channel's row offset, added in float32 while
    ``C·width < 2^24`` (exact there; float64 above)."""
    c, half = x.shape[1], 2 ** s
    t = torch.ceil(x * float(half)).clamp_(-half, half)
    exact = torch.float32 if c * width < 2 ** 24 else torch.float64
    t = t.to(torch.promote_types(t.dtype, exact))
    t.add_(torch.arange(c, device=x.device, dtype=t.dtype).mul_(width).add_(half)
           .view((1, c) + (1,) * (x.ndim - 2)))
    return flat_index(t, x)


def grid_lookup(x: torch.Tensor, s: int, table: torch.Tensor) -> torch.Tensor:
    """Nearest points from a :func:`grid_table` (or any table of its shape), in ``x``'s shape
    and memory layout."""
    return lookup(table, grid_index(x, s, table.shape[1]), x)


def point_exponent(points: torch.Tensor) -> int | None:
    """Smallest e with every point a multiple of 2^-e (official set: 10), or None: the points
    are then the integers ``points·2^e`` times 2^-e."""
    p = points.detach().double().cpu()
    for e in range(MAX_GRID_EXPONENT + 1):
        scaled = p * 2.0 ** e
        if bool((scaled == scaled.round()).all()):
            return e
    return None


def subset_normalize(x: torch.Tensor, mode: str, post_relu: bool, eps: float, *,
                     guard: tuple[torch.Tensor, torch.Tensor] | None = None,
                     pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
                     multiplier: torch.Tensor | None = None):
    """DFSQ's channel normalization, ``(x̃, scale, mean)`` with ``x = x̃·scale [+ mean]``
    (mean None when not shifted): the range guard's clamp (``guard``: per-channel lo, hi),
    then per (image, channel) statistics (``dynamic``) or the static ``pre``/``post``
    multiplies. ``multiplier`` (per channel, learned by reconstruction; 1 = DFSQ bit for bit)
    scales every channel's normalization scale, and with it the spacing of its points. The
    fake-quantizer and its lowered form (fxquant/lower/subset.py) both call it, so their
    normalized values are the same floats."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if guard is not None:
        x = torch.clamp(x, guard[0].view(shape), guard[1].view(shape))
    if mode == "dynamic":
        scale, mean = dynamic_stats(x, post_relu, eps)
        if multiplier is not None:
            scale = scale * multiplier.view(shape)
        if mean is not None:
            # one tensor, which Inductor stores: the compiled per-pixel loop then reads the
            # scale instead of recomputing it from the sums (fxquant/lower/daq.py, the same)
            scale, mean = torch.cat([scale, mean], 1).split(scale.shape[1], 1)
        return normalize(x, scale, mean), scale, mean
    if multiplier is None:
        return x * pre.view(shape), post.view(shape), None
    return x * (pre.view(shape) / multiplier.view(shape)), post.view(shape) * multiplier.view(shape), None


def nearest_point(x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Nearest-point quantization of ``x`` (``N × C × ...``) per channel (``points``: C × K).

    Vectorised, no loop over channels or points: points on a dyadic grid (DFSQ's universal
    sets) use a per-channel table indexed by ``ceil(x·2^s)`` (a few elementwise ops); other
    points a batched ``searchsorted`` against each channel's midpoints.
    """
    s = grid_exponent(points)
    if s is not None:
        return grid_lookup(x, s, grid_table(points, s, x.dtype))
    n, c = x.shape[0], x.shape[1]
    idx = nearest_index(x, points)
    table = points.to(x.dtype).unsqueeze(0).expand(n, c, points.shape[-1])
    return torch.gather(table, 2, idx).reshape(x.shape)


class SubsetQuantizer(StepMultiplierMixin, Quantizer):
    """Per-input-channel subset quantizer with DFSQ's channel normalization.

    ``mode="dynamic"`` is the official per-(image, channel) normalization (mean shift unless
    ``post_relu``); ``mode="static"`` divides by a calibrated per-channel scale: ``pre``
    (= 1/s_c) multiplies before quantization and ``post`` (= s_c) after. The
    ``fold-channel-norm`` pass folds them into neighbouring convs and sets them to 1.
    ``quant_mode = "off"`` (the quantizer contract's one switch) skips the rounding but keeps
    the static normalization multiplies (the identity up to float rounding), which is how
    folds are checked for equivalence. ``step_multiplier`` (per channel, 1 = DFSQ) scales the
    normalization scale; reconstruction learns it (the gradient reaches it through the
    straight-through rounding of the normalized value, LSQ-style).
    """

    kind = "subset"

    def __init__(self, bits: int, channels: int, *, post_relu: bool = False,
                 mode: str = "dynamic", eps: float = EPS, guard: bool = False):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"subset quantizer mode '{mode}' unknown; choose one of {', '.join(MODES)}")
        self.bits = bits
        self.channels = channels
        self.post_relu = post_relu
        self.mode = mode
        self.eps = eps
        k = 2 ** bits
        self.register_buffer("points", torch.linspace(-1.0, 1.0, k).expand(channels, k).clone())
        if mode == "static":
            self.register_buffer("pre", torch.ones(channels))
            self.register_buffer("post", torch.ones(channels))
        self.guard = guard
        if guard:
            self.register_buffer("guard_lo", torch.full((channels,), -float("inf")))
            self.register_buffer("guard_hi", torch.full((channels,), float("inf")))
        self.init_step_multiplier(channels)

    def set_points(self, points: torch.Tensor) -> None:
        with torch.no_grad():
            self.points.copy_(points.reshape(self.points.shape).sort(-1).values)

    def set_guard(self, lo: torch.Tensor, hi: torch.Tensor, factor: float) -> None:
        """Range guard: clamp channel c to ``mid ± factor·half`` of its calibration range."""
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        with torch.no_grad():
            self.guard_lo.copy_((mid - factor * half).reshape(-1))
            self.guard_hi.copy_((mid + factor * half).reshape(-1))

    def set_scale(self, scale: torch.Tensor) -> None:
        """Static mode: ``pre = 1/scale``, ``post = scale`` (per channel)."""
        if self.mode != "static":
            raise ValueError("set_scale applies to static-mode subset quantizers")
        scale = scale.detach().float().reshape(-1)
        with torch.no_grad():
            self.pre.copy_(1.0 / scale)
            self.post.copy_(scale)

    def _lookup(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest points of ``x``; the grid table is cached until the points change."""
        key = (self.points._version, self.points.data_ptr(), x.dtype, x.device)
        cached = getattr(self, "_table_cache", None)
        if cached is None or cached[0] != key:
            s = grid_exponent(self.points)
            table = grid_table(self.points, s, x.dtype) if s is not None else None
            cached = (key, s, table)
            self._table_cache = cached
        _, s, table = cached
        if s is None:
            return nearest_point(x, self.points)
        return grid_lookup(x, s, table)

    def quantize_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """``x̃ + stopgrad(q − x̃)`` for an already normalized ``x̃``."""
        q = self._lookup(x.detach())
        if not (x.requires_grad and torch.is_grad_enabled()):
            return q  # the exact point (x + (q − x) can be off by an ulp)
        return x + (q - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "off" keeps a static quantizer's pre/post multiplies: once some are folded into
        # neighbouring convs, the rest are part of the float function the folds preserve.
        if self.quant_mode == "off" and self.mode == "static":
            normalized, scale, mean = self._normalize(x)
            return denormalize(normalized, scale, mean)
        return super().forward(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        normalized, scale, mean = self._normalize(x)
        return denormalize(self.quantize_normalized(normalized), scale, mean)

    def integer_codes(self, x: torch.Tensor) -> CodebookCodes:
        """Index of each value's point in its channel's sorted point set, with the points and
        the de-normalization (per (image, channel) when dynamic, per channel when static)."""
        with torch.no_grad():
            normalized, scale, mean = self._normalize(x.detach())
            q = self._lookup(normalized)
            n, c = q.shape[:2]
            # q is exactly one of the channel's points: its rank among them is the code
            codes = torch.searchsorted(self.points.to(q.dtype).unsqueeze(0).expand(n, c, -1)
                                       .contiguous(), q.reshape(n, c, -1).contiguous())
        return CodebookCodes(codes.reshape(q.shape).to(torch.int32), self.points.to(q.dtype),
                             scale, mean)

    def _normalize(self, x: torch.Tensor):
        """``(x̃, scale, mean)`` with ``x = x̃·scale [+ mean]`` (mean None when not shifted)."""
        return subset_normalize(x, self.mode, self.post_relu, self.eps,
                                guard=(self.guard_lo, self.guard_hi) if self.guard else None,
                                pre=self.pre if self.mode == "static" else None,
                                post=self.post if self.mode == "static" else None,
                                multiplier=self.step_multiplier)

    @property
    def folded(self) -> str:
        """Static mode: which of the two multiplies are folded away (``pre``, ``post``)."""
        if self.mode != "static":
            return ""
        done = [name for name in ("pre", "post") if bool((getattr(self, name) == 1).all())]
        return "+".join(done) if done else "none"

    def describe(self) -> dict:
        if self.mode == "dynamic":
            granularity = "per-channel points, per-image-channel norm"
        else:
            granularity = "per-channel points, per-channel static norm"
        info = {"kind": self.kind, "bits": self.bits, "granularity": granularity,
                "mode": self.mode, "points": 2 ** self.bits, "post_relu": self.post_relu}
        if self.mode == "static":
            info["folded"] = self.folded
        if self.guard:
            info["guard"] = True
        return self.with_multiplier(info)

    def check(self) -> None:
        p = self.points
        if not torch.isfinite(p).all():
            raise ValueError("subset quantizer has non-finite points")
        if p.shape != (self.channels, 2 ** self.bits):
            raise ValueError(f"subset quantizer points have shape {tuple(p.shape)}, expected "
                             f"{(self.channels, 2 ** self.bits)}")
        if not (p[:, 1:] > p[:, :-1]).all():
            raise ValueError("subset quantizer points are not sorted and distinct per channel")
        if self.mode == "static":
            for name in ("pre", "post"):
                v = getattr(self, name)
                if not torch.isfinite(v).all() or (v <= 0).any():
                    raise ValueError(f"subset quantizer has a non-finite or non-positive '{name}'")
        check_multiplier(self.step_multiplier, "subset quantizer")


class SampleObserver(Observer):
    """Records a uniform random sample (at most ``max_samples`` positions) of each channel's
    normalized input, for point selection.

    ``mode="dynamic"`` stores values normalized exactly as the quantizer will (per image and
    channel); ``mode="static"`` stores raw values and the per-channel max-abs, normalized by
    :meth:`normalized_samples` once calibration is over. Sampling keeps the positions with the
    smallest random keys (a bottom-k sketch), so it is uniform over every calibration value
    seen, whatever the batch sizes; the keys come from a seeded generator.
    """

    kind = "subset-samples"
    finite_from_range = True

    def __init__(self, node_name: str = "", channels: int = 0, *, post_relu: bool = False,
                 mode: str = "dynamic", max_samples: int = 16384, seed: int = 0,
                 eps: float = EPS):
        super().__init__(node_name)
        if mode not in MODES:
            raise ValueError(f"observer mode '{mode}' unknown; choose one of {', '.join(MODES)}")
        self.channels = channels
        self.post_relu = post_relu
        self.mode = mode
        self.max_samples = max(1, int(max_samples))
        self.eps = eps
        self.generator = torch.Generator().manual_seed(seed)
        self.values: torch.Tensor | None = None  # C × s
        self.keys: torch.Tensor | None = None  # s
        self.max_abs: torch.Tensor | None = None
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None
        self.seen = 0

    def observe(self, x: torch.Tensor) -> None:
        n, c = x.shape[0], x.shape[1]
        flat = x.reshape(n, c, -1)
        scale, mean, lo, hi = dynamic_stats_minmax(x, self.post_relu, self.eps)
        lo, hi = lo.reshape(n, c), hi.reshape(n, c)
        self.check_range(lo, hi)
        ch_lo, ch_hi = lo.amin(0), hi.amax(0)
        self.min_val = ch_lo if self.min_val is None else torch.minimum(self.min_val, ch_lo)
        self.max_val = ch_hi if self.max_val is None else torch.maximum(self.max_val, ch_hi)
        if self.mode == "static":
            m = torch.maximum(-ch_lo, ch_hi)
            self.max_abs = m if self.max_abs is None else torch.maximum(self.max_abs, m)
        # bottom-k sketch over positions (image, pixel): only keys below the current k-th
        # smallest can enter, so only those values are gathered (and normalized)
        per_image = flat.shape[2]
        keys = torch.rand(n * per_image, generator=self.generator)
        self.seen += keys.numel()
        if self.keys is not None and self.keys.numel() >= self.max_samples:
            candidates = (keys < self.keys.max()).nonzero()[:, 0]
        else:
            candidates = torch.arange(keys.numel())
        image, pixel = candidates // per_image, candidates % per_image
        values = flat[image, :, pixel]  # m × C
        if self.mode == "dynamic":
            values = values.unsqueeze(-1)  # as N × C × 1 per position: the quantizer's formula
            stat = scale.reshape(n, c, 1)[image]
            values = (values - mean.reshape(n, c, 1)[image]) / stat if mean is not None else values / stat
            values = values.squeeze(-1)
        values, keys = values.t(), keys[candidates]
        if self.values is not None:
            values = torch.cat([self.values, values], 1)
            keys = torch.cat([self.keys, keys])
        if keys.numel() > self.max_samples:
            keep = keys.topk(self.max_samples, largest=False).indices
            values, keys = values[:, keep], keys[keep]
        self.values, self.keys = values.contiguous(), keys

    def scale(self) -> torch.Tensor:
        """Static mode: the per-channel scale ``max|x_c| + eps``."""
        return static_scale(self.max_abs, self.eps)

    def normalized_samples(self) -> torch.Tensor:
        """``C × s`` calibration values as the quantizer will see them after normalization."""
        if self.values is None:
            raise ValueError(f"observer at '{self.node_name}' saw no data")
        if self.mode == "dynamic":
            return self.values
        return self.values / self.scale()[:, None]

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": "observer", "batches": self.batches,
                "granularity": f"{self.mode} norm", "post_relu": self.post_relu}
