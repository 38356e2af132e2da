"""DFSQ lowered: the subset quantizer's points as integer codes, read by the per-image folded
conv DAQ lowers to (fxquant/lower/daq.py).

A subset quantizer snaps each normalized value ``x̃`` to one of its channel's points ``P_c``
and de-normalizes, ``x̂ = P·s_{n,c} + μ_{n,c}`` (dynamic: ``s = m + eps`` and ``μ`` per
(image, channel), ``μ = 0`` post-ReLU; static: ``s = post_c``, ``μ = 0``). The points are
universal-set values, multiples of 2^-e (official set: e = 10), so each is an integer
``I = P·2^e`` (−1024…1024). Per channel, with ``b_c = min I`` and ``g_c`` the gcd of
``I − b_c``::

    q       = (I − b_c)/g_c                   integer codes >= 0 (exact in float32)
    Δ_{n,c} = s_{n,c}·g_c·2^-e                the per-(image, channel) step
    β_{n,c} = μ_{n,c} + s_{n,c}·b_c·2^-e       the offset
    x̂       = Δ·q + β

— the ``(codes, Δ, β)`` contract of DAQ's folded conv, which then does the rest exactly as
for DAQ (per-image weight fold, border-exact offset term; ``cpu`` splits codes above 255
into uint8 planes). The normalization and the grid index are the fake-quantizer's own
functions (:func:`~fxquant.quant.subset.subset_normalize`,
:func:`~fxquant.quant.subset.grid_index`), and the table holds each grid entry's code in
place of its point, so the codes are exactly those of the fake-quant points. DFSQ's weights (uniform, asymmetric, per output
channel) become the conv's integer weight codes ``2(k − z)`` with step ``Δ_w/2``.

Codes span up to 2^(e+1) + 1 values (11 bits for the official set): on ``cpu`` that is two
uint8 planes ``q = lo + 256·hi`` (a list; two u8 × s8 convs per weight plane), on
``reference`` int32 codes.

``codes="u8"`` (``lower{subset_codes=u8}``) trades exactness for one uint8 plane: a channel
whose codes pass 255 gets 256 levels over its points' span, step ``g'_c = (max I − b_c)/255``
grid units in place of ``g_c``, and each point the nearest level (the point chosen is still
the fake-quantizer's nearest; only its value moves, by at most half a level, span/510). Both
ends of the span stay exact, so do channels that already fit a byte. Its Set5 cost against
the exact codes is measured in docs/lowering.md ("DFSQ codes on one byte").
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.errors import PassError
from fxquant.lower.conv import LoweringError
from fxquant.lower.folded import LAYERS, lower_folded
from fxquant.lower.search import SearchedCodes, codes_by_search
from fxquant.quant import UniformQuantizer
from fxquant.quant.base import ones_if_missing
from fxquant.quant.channel_norm import channel_mean
from fxquant.quant.subset import (
    SubsetQuantizer,
    grid_exponent,
    grid_lookup,
    grid_table,
    midpoints,
    point_exponent,
    subset_normalize,
)

CODE_GRIDS = ("exact", "u8")  # the points' own integers; one byte per code (module doc)


class SubsetQuantize(SearchedCodes, nn.Module):
    """Float tensor → ``(codes, Δ, β, ĉ)`` of a DFSQ subset quantizer (module doc); ``ĉ``,
    the codes' expected value, is None in static mode.

    Persistent state is the quantizer's (points, range guard, static multiplies); the lookup
    table and the per-channel code base and gcd are derived from the points, recomputed on
    ``load_state_dict``."""

    def __init__(self, channels: int, bits: int, post_relu: bool, mode: str, eps: float,
                 guard: bool, channels_last: bool, codes: str = "exact"):
        super().__init__()
        if codes not in CODE_GRIDS:
            raise ValueError(f"subset codes '{codes}': valid are {', '.join(CODE_GRIDS)}")
        self.channels, self.bits, self.post_relu, self.codes = channels, bits, post_relu, codes
        self.mode, self.eps, self.guard, self.channels_last = mode, eps, guard, channels_last
        self.source = ""
        k = 2 ** bits
        # placeholder points on the 2^-4 grid until from_quantizer / load_state_dict
        self.register_buffer("points", (torch.arange(k) - k // 2).float().div(16)
                             .expand(channels, k).clone())
        if guard:
            self.register_buffer("guard_lo", torch.full((channels,), -float("inf")))
            self.register_buffer("guard_hi", torch.full((channels,), float("inf")))
        if mode == "static":
            self.register_buffer("pre", torch.ones(channels))
            self.register_buffer("post", torch.ones(channels))
        self.register_buffer("step_multiplier", torch.ones(channels))  # learned; 1 = DFSQ
        self.register_load_state_dict_pre_hook(ones_if_missing("step_multiplier", channels))
        self.register_buffer("table", torch.zeros(channels, 3), persistent=False)
        self.register_buffer("base", torch.zeros(channels, 1, 1), persistent=False)
        self.register_buffer("code_step", torch.ones(channels, 1, 1), persistent=False)
        self.register_buffer("mids", torch.zeros(k - 1, channels), persistent=False)
        self.register_buffer("point_codes", torch.zeros(k, channels), persistent=False)
        self.lookup_exponent, self.point_exponent, self.max_code = 0, 0, 0
        self.choose_compiled_codes(bits)
        self._derive()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._derive())

    @classmethod
    def from_quantizer(cls, quantizer: SubsetQuantizer, channels_last: bool,
                       source: str = "", copy_points: bool = True,
                       codes: str = "exact") -> "SubsetQuantize":
        module = cls(quantizer.channels, quantizer.bits, quantizer.post_relu, quantizer.mode,
                     quantizer.eps, quantizer.guard, channels_last, codes)
        module.source = source
        with torch.no_grad():
            for name, buffer in module.named_buffers(recurse=False):
                if name in module._derived or (name == "points" and not copy_points):
                    continue
                buffer.copy_(getattr(quantizer, name))
        module._derive()
        return module

    _derived = ("table", "base", "code_step", "mids", "point_codes")

    def _derive(self) -> None:
        """Lookup table, code base ``b_c`` and code step (``g_c``, or ``u8``'s span/255)
        from the points."""
        s, e = grid_exponent(self.points), point_exponent(self.points)
        if s is None or e is None:
            raise ValueError("subset points are not on a dyadic grid (multiples of 2^-16): "
                             "they have no integer codes")
        ints = (self.points.double() * 2.0 ** e).round().long()
        base = ints.min(dim=1).values
        gcd = torch.zeros_like(base)
        for j in range(ints.shape[1]):  # gcd over the K points of every channel at once
            gcd = torch.gcd(gcd, ints[:, j] - base)
        gcd = torch.where(gcd > 0, gcd, torch.ones_like(gcd)).double()
        step = gcd
        if self.codes == "u8":  # a channel whose codes pass 255: 256 levels over its span
            span = (ints.max(dim=1).values - base).double()
            step = torch.where(span / gcd > 255, span / 255, gcd)
        self.lookup_exponent, self.point_exponent = s, e
        # each point's code (integers; exact unless u8 re-grids), then the grid table of the
        # codes themselves: the forward looks a code up directly, with no arithmetic on the
        # point after the lookup
        point_codes = ((ints.double() - base[:, None]) / step[:, None]).round()
        self.max_code = int(point_codes.max())
        self.table = grid_table(self.points.double(), s, torch.float64, values=point_codes) \
            .to(torch.uint8 if self.max_code <= 255 else torch.int32)
        self.base = base.float().view(-1, 1, 1)
        self.code_step = step.float().view(-1, 1, 1)
        # the compiled path's search (codes_by_thresholds): rows of one value per
        # channel, so that each row is one contiguous vector load along NHWC's channels
        self.mids = midpoints(self.points.double()).float().t().contiguous()  # dyadic: exact
        self.point_codes = point_codes.float().t().contiguous()

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        """``x``: the quantizer's input, or the channel pieces it is the concatenation of
        (``dynamic_cat_pieces``, passes/lower_rewrites.py): the statistics and the points
        are per channel, so each piece's codes are computed where it lies and only the codes
        are concatenated."""
        if not isinstance(x, (list, tuple)):
            return self.join_codes([self.piece_codes(x, 0, self.channels)])
        parts, start = [], 0
        for piece in x:
            parts.append(self.piece_codes(piece, start, start + piece.shape[1]))
            start += piece.shape[1]
        return self.join_codes(parts)

    def piece_codes(self, x: torch.Tensor, first: int, end: int):
        """``(codes, Δ, β, ĉ)`` of the quantizer's channels ``first..end-1``, ``x`` holding
        just those channels, for :meth:`join_codes`. ``hoist_subset_pieces``
        (passes/lower_rewrites.py) calls it where each piece of a concatenation is made."""
        if x.shape[1] != end - first:
            raise LoweringError(f"'{self.source}': a piece of channels {first}..{end - 1} "
                                f"has {x.shape[1]} channels, not {end - first}")
        return self._quantize(x, first, end)

    def join_codes(self, parts: list[tuple]):
        """The quantizer's output from its pieces' :meth:`piece_codes`, in channel order:
        the codes side by side (uint8 planes ``lo + 256·hi`` on ``cpu`` where they pass 255,
        NHWC there)."""
        if len(parts) == 1:
            codes, step, offset, centre = parts[0]
        else:
            codes, step, offset = (torch.cat([part[i] for part in parts], 1) for i in range(3))
            centre = None if parts[0][3] is None else torch.cat([part[3] for part in parts], 1)
        if codes.dtype == torch.int32:
            if not self.channels_last:  # reference: int32 codes
                return codes, step, offset, centre
            # cpu: uint8 planes q = lo + 256·hi, made here where lower{compile} fuses them
            codes = [torch.bitwise_and(codes, 255).to(torch.uint8),
                     torch.bitwise_right_shift(codes, 8).to(torch.uint8)]
        if self.channels_last:
            codes = codes.contiguous(memory_format=torch.channels_last) \
                if isinstance(codes, torch.Tensor) else \
                [c.contiguous(memory_format=torch.channels_last) for c in codes]
        return codes, step, offset, centre

    def _quantize(self, x: torch.Tensor, first: int, end: int):
        """``(codes, Δ, β, ĉ)`` of channels ``first..end-1`` of the quantizer, ``x`` holding
        just those channels."""
        channels = slice(first, end)
        normalized, scale, mean = subset_normalize(
            x, self.mode, self.post_relu, self.eps,
            guard=(self.guard_lo[channels], self.guard_hi[channels]) if self.guard else None,
            pre=self.pre[channels] if self.mode == "static" else None,
            post=self.post[channels] if self.mode == "static" else None,
            multiplier=self.step_multiplier[channels])
        with torch.no_grad():
            if self.searches(end - first):
                codes = self.codes_by_thresholds(normalized, channels)
            else:
                codes = grid_lookup(normalized, self.lookup_exponent, self.table[channels])
            unit = 2.0 ** -self.point_exponent
            n, width = x.shape[0], end - first
            base, code_step = self.base[channels], self.code_step[channels]
            scale = scale.expand(n, width, 1, 1)
            step = scale * (code_step * unit)
            offset = scale * (base * unit)
            # the codes' expected value ĉ = (E[x] − β)/Δ (fxquant/lower/folded.py charges the
            # requantized weights' error on it to the offset term): mean-shifted, the code of
            # point 0, −b_c/g_c, exactly; post-ReLU from the input's mean, one more reduction
            # beside the maximum over the same chunks (Inductor takes both in one pass);
            # static: none
            centre = None
            if mean is not None:
                offset = offset + mean
                centre = (-base / code_step).unsqueeze(0).expand(n, width, 1, 1)
            elif self.mode == "dynamic":
                centre = (channel_mean(x) - offset) / step
        return codes, step, offset, centre

    def codes_by_thresholds(self, normalized: torch.Tensor,
                            channels: slice = slice(None)) -> torch.Tensor:
        """The table's codes by the branch-free search of the sorted midpoints
        (:func:`~fxquant.lower.search.codes_by_search`), used under ``lower{compile=true}``
        up to :data:`~fxquant.lower.search.THRESHOLD_BITS` (:attr:`compiled_codes`); eager
        keeps the table, where each select would be a pass of its own. Ties (x̃ on a
        midpoint) go to the lower point as in the table: every midpoint is a multiple of
        2^-s, so ``ceil(x̃·2^s) > mid·2^s`` exactly when ``x̃ > mid``; the table's clamp to ±1
        changes nothing, every point lying in [−1, 1]. ``channels``: the quantizer's channels
        that ``normalized`` holds (all by default)."""
        codes = codes_by_search(normalized, self.mids[:, channels],
                                self.point_codes[:, channels], self.bits)
        return codes.to(self.table.dtype)

    def extra_repr(self) -> str:
        kind = ("u8, re-gridded" if self.codes == "u8" else "u8") if self.max_code <= 255 else \
            ("two u8 planes lo + 256·hi" if self.channels_last else "int32")
        return (f"channels={self.channels}, points={2 ** self.bits} on 2^-{self.point_exponent},"
                f" mode={self.mode}, codes 0..{self.max_code} ({kind})"
                + (", NHWC" if self.channels_last else ""))


def lower_subset(gm: fx.GraphModule, node: fx.Node, quantizer: SubsetQuantizer, target: str,
                 pass_name: str = "lower", structure_only: bool = False,
                 planes: int = 2, codes: str = "exact") -> int:
    """Replace subset quantizer ``node`` and the QuantConv2d(s) it feeds by
    :class:`SubsetQuantize` (its ``codes``: exact or re-gridded to one byte, module doc) and
    the target's folded conv; return how many convs were lowered. ``structure_only``
    (``fxquant.load`` rebuilding a saved lowered model, whose quantizers hold no points yet)
    keeps the module's placeholder points for the state dict to replace."""
    if target not in LAYERS:  # reference, cpu, gpu (fxquant/lower/triton_conv.py)
        raise PassError(pass_name, f"DFSQ subset quantizers lower to targets "
                        f"{', '.join(LAYERS)}, not '{target}'", node=node.name)

    def check_weights(user, conv):
        wq = conv.weight_quantizer
        if not isinstance(wq, UniformQuantizer) or wq.bits > 8:
            raise PassError(pass_name, f"weights of '{user.target}' use a {wq.kind} quantizer "
                            f"of {wq.describe()['bits']} bits; a subset-quantized input lowers "
                            "with uniform weights of 2..8 bits", node=user.name)

    try:
        codes = SubsetQuantize.from_quantizer(quantizer, LAYERS[target].channels_last,
                                              str(node.target), copy_points=not structure_only,
                                              codes=codes)
    except ValueError as exc:
        raise PassError(pass_name, str(exc), node=node.name) from None
    return lower_folded(gm, node, codes, target, pass_name, "DFSQ", check_weights, planes)
