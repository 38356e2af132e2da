"""DAQ lowered: the dynamic per-(image, channel) quantizer as integer codes, and the conv as
a per-image weight fold applied to those codes plus an exactly border-corrected offset term.

For one DAQ-quantized conv (activation quantizer in front of a ``QuantConv2d`` whose weight
quantizer is DAQ's σ-scaled symmetric mid-rise one)::

    μ, Δ      per (n, c), computed by the fake-quantizer's own function (same float ops)
    q_{n,c}   integer codes >= 0 with x̂ = Δ_{n,c}·q + β_{n,c}:
                signed:        q = c + 2^(b−1) − 1 ∈ 0..2^b − 1,  β = μ − (2^b − 1)/2·Δ
                relu (HEAD):   q = round(x/Δ − k) + k = round(x/Δ) ≥ 0, unbounded, β = 0
                relu-clipped:  q ∈ 0..2^b − 1,                            β = 0
              (c the fake-quantizer's mid-rise code; a channel with Δ = 0 gets q = 0, β = μ)
    K         odd integer weight codes 2c_w − 1 ∈ ±(2^b_w − 1), Ŵ = K·Δ_w/2
    y_n       = Σ_c (Ŵ[:, c]·Δ_{n,c}) ⋆ q_{n,c}          per-image folded weights ⋆ codes
              + Σ_c Ŵ[:, c] ⋆ (β_{n,c}·1_{H×W})           conv of a constant plane, zero padded
              + bias

The second term is the conv of a per-channel constant image with zero padding: constant per
output channel inside, different at the border (only the taps that land inside the image
count). It is computed exactly, separably: ``V[n,o,i,j] = Σ_c β_{n,c}·Ŵ[o,c,i,j]`` and
``out[n,o,y,x] = Σ_ij V[n,o,i,j]·R[i,y]·C[j,x]`` with ``R``/``C`` the 0/1 masks of taps that
land inside the image (rows/columns), i.e. ``O(N·O·k·H'·W')``.

Targets (the conv classes and the shared lowering step are in fxquant/lower/folded.py):

* ``reference`` (:class:`ReferenceDaqConv2d`): integer codes (uint8; int32 for the unclipped
  relu branch), integer weight codes; the fold, the convolution and the offset term in
  float64 (each folded weight ``K·Δ_w/2·Δ_{n,c}`` is exact in float64 for ``b_w <= 5``:
  5 + 24 + 24 mantissa bits), output float32. It is the conv of the exactly de-quantized
  input and weight, up to float64 summation error (≈ fan-in·2^−53 relative).
* ``cpu`` (:class:`CpuDaqConv2d`): the same codes as uint8 NHWC (per-tensor scale 1, zero
  point 0) into oneDNN's int8 conv, with the per-image folded weights ``Ŵ·Δ_{n,c}``
  requantized to int8 per (image, output channel) and prepacked on every call; exact int32
  accumulation of u8 × int8 (bounded by ``fan-in·255·127``), float32 rescale and bias in
  oneDNN, offset term in float32. The requantization of the folded weights to int8 is lossy,
  so a second int8 plane carries its residual (two u8 × s8 convs of the same codes; layer
  outputs within ~2e-4 of their range). ``lower{planes=1}`` keeps one plane: faster, 1–2 %
  of a layer's range and, with the balanced codes below and the codes' expected value ĉ
  charged to the offset term (fxquant/lower/folded.py), within 0.01 dB of fake-quant on Set5
  (docs/lowering.md). Unclipped relu codes above 255 are split into uint8 planes
  ``q = q_lo + 256·q_hi`` and convolved with the same packed weights.

Balanced codes (``cpu`` and ``gpu``, the bounded branches): a b-bit code uses 4 of uint8's 8
bits, so each (image, channel) is handed as ``m·q`` with step ``Δ/m`` — the same value
``(Δ/m)·(m·q) = Δ·q`` — for the integer ``m_{n,c} = ⌈M·Δ_{n,c}/max_c Δ_{n,c}⌉``, ``1 <= m <=
M = ⌊L/(2^b − 1)⌋`` (``L``: the target conv's ``code_limit()``, 255, or on ``cpu`` 128
where the CPU's int8 pairs saturate, so that no weight split is needed). The folded weights
``Ŵ·Δ/m`` are then balanced across input channels, and their per-(image, output channel)
int8 requantization keeps up to log2(M) more bits for the channels with small steps (M = 17
at 4 bits): the one-plane error falls from ``max|W'|/254`` per weight to about each
channel's own ``|W'_c|/254`` (docs/lowering.md).
The codes are still exactly the fake-quant levels; ``reference`` keeps ``m = 1`` (its fold is
exact in float64) and so does ``DaqQuantize.code_limit = 0``.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.errors import PassError
from fxquant.lower.conv import INT32_MAX, LoweringError
from fxquant.lower.folded import LAYERS, NON_FINITE, lower_folded
from fxquant.quant.base import ones_if_missing
from fxquant.quant.daq import DAQActivationQuantizer, _daq_params
from fxquant.quant.daq_weights import DAQWeightQuantizer

LOWERED_BRANCHES = ("signed", "relu", "relu-clipped")


# --------------------------------------------------------------------------- codes
def daq_input_codes(x, bits, branch: str, qq_bits: int = 0, step_index: str = "head",
                    strict: bool = True, multiplier: torch.Tensor | None = None,
                    balance: int = 0, dtype: torch.dtype | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, Δ, β, ĉ)`` with ``x̂ = Δ·q + β`` equal to :func:`~fxquant.quant.daq.daq_quantize`'s
    output: ``q`` integer-valued (>= 0), ``Δ``, ``β`` and the codes' expected value ``ĉ``
    (:func:`code_centre`) N×C×1×1 (see module doc).

    The statistics and the rounding are the fake-quantizer's own (``_daq_params``, the same
    division/round/clamp), so the codes are exactly the fake-quant levels. Channels whose
    statistics overflow raise here (``strict``), or get a NaN step for the caller to refuse
    (no data-dependent branch: the cpu target compiles this function). ``x`` may be a list of
    channel pieces: the codes of their concatenation, computed piece by piece (each piece
    read where it lies, the codes concatenated, in ``dtype`` if given). ``balance`` > 0 (the
    bounded branches): balanced codes ``m·q`` with step ``Δ/m`` up to that limit
    (:func:`balanced_multipliers`)."""
    if branch not in LOWERED_BRANCHES:
        raise LoweringError(f"DAQ branch '{branch}' has no integer form; lowered: "
                            f"{', '.join(LOWERED_BRANCHES)}")
    pieces = list(x) if isinstance(x, (list, tuple)) else [x]
    with torch.no_grad():
        mu, safe, valid, finite, h = _daq_params(pieces, bits, branch, qq_bits, step_index,
                                                 multiplier)
        if strict and not bool(finite.all()):
            raise LoweringError(NON_FINITE)
        step = safe * valid
        if not strict:
            step = torch.where(finite, step, torch.full_like(step, float("nan")))
        offset = mu - h * step if branch == "signed" else mu * ~valid
        m = None
        if balance and branch != "relu":
            top = 2 * h  # 2^b − 1: the largest bounded code
            m = balanced_multipliers(step, top, balance)
        # the codes' factor, small integers (exact): m, and 0 for a relu channel without a
        # step (a signed one's codes meet a zero step instead)
        ones = torch.ones_like(mu) if m is None else m
        factor = ones if branch == "signed" else valid * ones
        # One tensor of the per-channel parameters: Inductor stores a concatenation, so the
        # per-pixel loop below reads three numbers per channel instead of redoing the
        # statistics' arithmetic (the square root, the finiteness masks, the balancing) for
        # every pixel: IMDN-shaped codes at 256×256 ran 1.5× faster (tools/daq_codes_timing.py;
        # docs/performance.md, "DAQ codes: per-channel parameters stored once").
        channels = mu.shape[1]
        mu, safe, factor = torch.cat([mu, safe, factor], 1).split(channels, 1)
        centre = code_centre(mu, safe, factor, h, branch)
        codes, first = [], 0
        for piece in pieces:
            part = slice(first, first + piece.shape[1])
            first = part.stop
            h_part = h[:, part] if isinstance(h, torch.Tensor) else h
            q = _piece_codes(piece, mu[:, part], safe[:, part], factor[:, part], h_part, branch)
            codes.append(q if dtype is None else q.to(dtype))
        q = codes[0] if len(codes) == 1 else torch.cat(codes, 1)
        return q, (step if m is None else step / m), offset, centre


def code_centre(mu, safe, factor, h, branch: str) -> torch.Tensor:
    """Per (image, channel), about the mean of the codes as handed (``factor·q``): the
    statistics' ``(μ − β)/Δ``, clamped to the codes' range. Exact for a signed channel up to
    its clipping (``β = μ − hΔ``: the middle code ``h``); a relu channel has ``β = 0`` where it
    has a step (``factor`` is 0 elsewhere), and its ``μ`` is the mean of its positive entries
    (``relu_stats``), an upper bound. The folded conv charges its weight requantization error
    with it (:meth:`~fxquant.lower.folded.CpuDaqConv2d.folded_planes`)."""
    if branch == "signed":
        return h * factor
    centre = torch.clamp(mu / safe, min=0)
    if branch == "relu-clipped":
        centre = torch.clamp(centre, max=2 * h)
    return centre * factor


def _piece_codes(x, mu, safe, factor, h, branch: str) -> torch.Tensor:
    """The integer codes of one channel piece from its parameters (module doc), times
    ``factor`` (per channel: the balancing multiplier, 0 for a relu channel without a step)."""
    if branch == "signed":
        c = torch.clamp(torch.round((x - mu) / safe + 0.5), -h + 0.5, h + 0.5)
        return (c + (h - 0.5)) * factor
    if branch == "relu":
        k = h - 0.5
        q = torch.round(x / safe - k) + k
    else:
        q = torch.clamp(torch.clamp(torch.round(x / safe), min=0), max=2 * h)
    return q * factor


def balanced_multipliers(step: torch.Tensor, top_code, limit: int) -> torch.Tensor:
    """Per-(image, channel) integers ``1 <= m <= M = max(⌊limit/top_code⌋, 1)``, about
    proportional to the step (``m = ⌈M·Δ_{n,c}/max_c Δ_{n,c}⌉``): codes ``m·q`` with step
    ``Δ/m`` hold the same values (module doc) and stay below ``limit`` where ``m > 1`` (a
    channel whose own codes reach the limit keeps ``m = 1``). ``top_code``: the largest code,
    an int or 1×C×1×1. Channels with Δ = 0 or a non-finite Δ get 1."""
    most = torch.clamp(torch.floor(limit / top_code), min=1) \
        if isinstance(top_code, torch.Tensor) else float(max(limit // top_code, 1))
    largest = step.amax(dim=1, keepdim=True)
    ratio = step / torch.where(largest > 0, largest, torch.ones_like(largest))
    # ceil: Δ/m <= max Δ/M for every channel, so no folded weight outgrows the largest
    # channel's and no channel's requantization error exceeds its unbalanced one
    m = torch.clamp(torch.ceil(ratio * most), min=1)
    m = torch.minimum(m, most) if isinstance(most, torch.Tensor) else m.clamp_(max=most)
    return torch.where(torch.isfinite(m), m, torch.ones_like(m))


class DaqQuantize(nn.Module):
    """Float tensor → ``(codes, Δ, β, ĉ)`` of a DAQ activation quantizer (one per conv call;
    ``ĉ``: :func:`code_centre`).

    ``codes``: uint8 (signed / relu-clipped: at most 8 bits), int32 for the unclipped relu
    branch (``round(x/Δ)`` has no upper bound; :attr:`max_code` records the largest seen, a
    value beyond int32 is refused); NHWC on ``cpu``. :attr:`code_limit` > 0 (the ``cpu`` and
    ``gpu`` convs' ``code_limit()``): bounded codes are handed balanced, ``m·q`` with step
    ``Δ/m`` (:func:`balanced_multipliers`); 0 hands ``q`` and ``Δ`` as they are."""

    def __init__(self, channels: int, branch: str, qq_bits: int, step_index: str,
                 channels_last: bool, code_limit: int | None = None):
        super().__init__()
        self.channels, self.branch, self.qq_bits = channels, branch, qq_bits
        self.step_index, self.channels_last = step_index, channels_last
        self.source = ""
        # largest balanced code (module doc), the target conv's (None: the cpu conv's for NHWC
        # codes, else 0); decided when the model is lowered or loaded (a saved model
        # re-lowers on load)
        if code_limit is None:
            code_limit = LAYERS["cpu"].code_limit() if channels_last else 0
        self.code_limit = code_limit
        self.max_code = 0  # largest code seen (not state: a statistic for reports)
        self.register_buffer("bits", torch.full((channels,), 4, dtype=torch.int64))
        # the quantizer's learned per-channel step factors (1: the official DAQ)
        self.register_buffer("step_multiplier", torch.ones(channels))
        self.register_load_state_dict_pre_hook(ones_if_missing("step_multiplier", channels))
        self._bits = 4  # Python int (uniform bits) or the buffer: no sync when compiled
        self.register_load_state_dict_post_hook(lambda module, _keys: module._cache_bits())

    def _cache_bits(self) -> None:
        lo, hi = int(self.bits.min()), int(self.bits.max())
        self._bits = lo if lo == hi else self.bits

    @classmethod
    def from_quantizer(cls, quantizer: DAQActivationQuantizer, channels_last: bool,
                       source: str = "", code_limit: int | None = None) -> "DaqQuantize":
        module = cls(quantizer.channels, quantizer.branch, quantizer.qq_bits,
                     quantizer.step_index, channels_last, code_limit)
        module.source = source
        with torch.no_grad():
            module.bits.copy_(quantizer.bits)
            module.step_multiplier.copy_(quantizer.step_multiplier.detach())
        module._cache_bits()
        return module

    def forward(self, x):
        """``x``: the quantizer's input, or the channel pieces it is the concatenation of
        (``dynamic_cat_pieces``: the statistics are per channel, so no piece is copied)."""
        bounded = self.branch != "relu"
        q, step, offset, centre = daq_input_codes(x, self._bits, self.branch, self.qq_bits,
                                          self.step_index, strict=not self.channels_last,
                                          multiplier=self.step_multiplier,
                                          balance=self.code_limit if bounded else 0,
                                          dtype=torch.uint8 if bounded else None)
        if bounded or self.channels_last:  # relu on cpu/gpu: integer-valued float32,
            codes = q  # split into u8 planes by the conv
        else:
            top = float(q.max()) if q.numel() else 0.0
            if top > INT32_MAX:
                raise LoweringError(f"DAQ relu-branch code {top:.0f} exceeds int32: the input "
                                    "is too large against its channel's step")
            self.max_code = max(self.max_code, int(top))
            codes = q.to(torch.int32)
        if self.channels_last:
            codes = codes.contiguous(memory_format=torch.channels_last)
        return codes, step, offset, centre

    def extra_repr(self) -> str:
        lo, hi = int(self.bits.min()), int(self.bits.max())
        bits = lo if lo == hi else f"{lo}-{hi}"
        kind = "u8" if self.branch != "relu" else \
            ("integer-valued float32 (u8 planes in the conv)" if self.channels_last else "int32")
        balanced = f", balanced to {self.code_limit}" if self.code_limit and \
            self.branch != "relu" else ""
        return f"channels={self.channels}, bits={bits}, branch={self.branch}, " \
               f"qq_bits={self.qq_bits}, {kind} codes{balanced}" + \
               (", NHWC" if self.channels_last else "")


# --------------------------------------------------------------------------- the pass
def lower_daq(gm: fx.GraphModule, node: fx.Node, quantizer: DAQActivationQuantizer,
              target: str, pass_name: str = "lower", planes: int = 2) -> int:
    """Replace DAQ activation quantizer ``node`` and the QuantConv2d(s) it feeds by
    :class:`DaqQuantize` and the target's DAQ conv (``planes`` int8 weight planes on cpu and
    gpu); return how many convs were lowered."""
    if target not in LAYERS:
        raise PassError(pass_name, f"DAQ lowers to targets {', '.join(LAYERS)}, not "
                        f"'{target}'", node=node.name)
    if quantizer.branch not in LOWERED_BRANCHES:
        raise PassError(pass_name, f"DAQ branch '{quantizer.branch}' (post_relu = 'initial') "
                        "clips to −μ, off the step grid: it has no integer form; lowered "
                        f"branches: {', '.join(LOWERED_BRANCHES)}", node=node.name)

    def check_weights(user, conv):
        if not isinstance(conv.weight_quantizer, DAQWeightQuantizer):
            raise PassError(pass_name, f"weights of '{user.target}' use a "
                            f"{conv.weight_quantizer.kind} quantizer; a DAQ activation lowers "
                            "with DAQ weights only", node=user.name)

    layer_cls = LAYERS[target]
    codes = DaqQuantize.from_quantizer(quantizer, layer_cls.channels_last, str(node.target),
                                       layer_cls.code_limit())
    return lower_folded(gm, node, codes, target, pass_name, "DAQ", check_weights, planes)
