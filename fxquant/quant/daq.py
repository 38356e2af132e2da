"""DAQ: channel-wise distribution-aware quantization (Hong et al., WACV 2022).

The math of the official code (Cheeun/DAQ-pytorch ``src/model/quantize.py``), see
``docs/methods/daq.md`` and METHODS.md §4:

* **activations** are quantized per (image, channel) with statistics computed at run time:
  ``μ``, ``σ`` over H×W (unbiased std), step ``Δ = s·σ`` with ``s`` from the Gaussian-optimal
  step table, and a *mid-rise* grid of exactly ``2^b`` levels around ``μ``::

      x̂ = μ + clip((round((x − μ)/Δ + 0.5) − 0.5)·Δ, −T, T),   T = (2^b/2 − 0.5)·Δ

  Inputs that the graph proves non-negative (post-ReLU) take a separate branch whose
  statistics count only positive entries (``n⁺ = #{x>0} + 1``); at the official HEAD its
  clamps are commented out, so it is the *unclipped* grid ``x̂ = Δ·round(x/Δ)`` (default),
  with a clipped ``2^b``-level variant and the initial commit's μ-centred clip as options.
  Optionally ``σ`` itself is quantized per image across channels (``qq`` bits).
* **weights** are quantized with the same symmetric mid-rise rule, ``μ = 0`` and
  ``σ_w = std(W)`` per tensor (official) or per output channel.
* both use a straight-through estimator with an identity gradient (no clipping mask) and
  detached statistics, so quantization-aware training can run through them.
* **mixed precision** (the paper's abstract; absent from the official code): bits per
  (layer, input channel), chosen from calibration data by :func:`allocate_bits` on the
  output-error sensitivities that :class:`DAQSensitivityObserver` measures.

Every function works on a per-channel ``bits`` tensor (vectorised: no loop over channels),
so mixed precision runs through the same quantizer as uniform-bit DAQ.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from fxquant.observers import Observer
from fxquant.quant.base import AffineCodes, Quantizer

# ``gaussian_steps`` of the official code: key j -> MSE-optimal uniform step (in units of σ)
# for a unit Gaussian with 2^j levels (j = 1: 2 levels -> 1.596, j = 2: 4 levels -> 0.996...).
GAUSSIAN_STEPS: dict[int, float] = {0: 2.0, 1: 1.596, 2: 0.996, 3: 0.586, 4: 0.335, 5: 0.188,
                                    6: 0.104, 7: 0.057, 8: 0.031, 15: 1 / 8, 16: 1 / 8}
# The three other tables of the file (unused there, kept for reference).
UNIFORM_STEPS = {0: 2.0, 1: 1.0, 2: 0.5, 3: 0.25, 4: 0.125}
LAPLACE_STEPS = {0: 2.0, 1: 1.414, 2: 1.087, 3: 0.731, 4: 0.456}
GAMMA_STEPS = {0: 2.0, 1: 1.154, 2: 1.060, 3: 0.796, 4: 0.540}

# HEAD (commit 3db632d, "fixed reproduce") looks up ``table[b - 1]``; the initial commit
# 45aa157 looked up ``table[b]``.
STEP_INDEX_OFFSET = {"head": -1, "initial": 0}
STEP_INDICES = tuple(STEP_INDEX_OFFSET)
DAQ_BITS = tuple(range(2, 9))  # table keys 1..8 exist for both indexings
BRANCHES = ("signed", "relu", "relu-clipped", "relu-initial")
WEIGHT_GRANULARITIES = ("per-tensor", "per-channel")

_LUT = torch.tensor([GAUSSIAN_STEPS.get(k, float("nan")) for k in range(17)], dtype=torch.float64)


def step_for_bits(bits: int, step_index: str = "head") -> float:
    """The step ``s`` (in units of σ) the official table gives for ``bits``."""
    check_bits(bits)
    return GAUSSIAN_STEPS[bits + STEP_INDEX_OFFSET[step_index]]


def check_bits(bits) -> None:
    values = bits.unique().tolist() if isinstance(bits, torch.Tensor) else [bits]
    bad = [b for b in values if b not in DAQ_BITS]
    if bad:
        raise ValueError(f"DAQ bits {bad} are not supported; the step table covers "
                         f"{DAQ_BITS[0]}..{DAQ_BITS[-1]}")


def _steps_and_half(bits: int | torch.Tensor, step_index: str, like: torch.Tensor,
                    shape: Sequence[int]) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Step ``s`` and half level count ``h = 2^b/2 − 0.5`` (scalars, or tensors of ``shape``)."""
    offset = STEP_INDEX_OFFSET[step_index]
    if not isinstance(bits, torch.Tensor):
        return GAUSSIAN_STEPS[bits + offset], 2.0 ** bits / 2 - 0.5
    b = bits.reshape(shape).to(device=like.device)
    s = _LUT.to(device=like.device, dtype=like.dtype)[b.long() + offset]
    h = torch.exp2(b.to(like.dtype)) / 2 - 0.5
    return s, h


# --------------------------------------------------------------------------- statistics
def signed_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel) mean and unbiased std over H×W, shape N×C×1×1 (σ = 0 for 1 pixel)."""
    if x.shape[-1] * x.shape[-2] < 2:
        return x.mean(dim=(2, 3), keepdim=True), torch.zeros_like(x[:, :, :1, :1])
    sigma, mu = torch.std_mean(x, dim=(2, 3), keepdim=True)
    return mu, sigma


def relu_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-ReLU statistics of the official code: positive entries with +1 in the count.

    ``n⁺ = #{x > 0} + 1``, ``μ = Σx / n⁺``, ``σ = sqrt(Σx² / n⁺ − μ²)``.
    """
    count = (x > 0).sum(dim=(2, 3), keepdim=True).to(x.dtype) + 1
    mu = x.sum(dim=(2, 3), keepdim=True) / count
    second = (x * x).sum(dim=(2, 3), keepdim=True) / count
    return mu, torch.sqrt(torch.clamp(second - mu * mu, min=0))


def quantize_sigma(sigma: torch.Tensor, qq_bits: int, step_index: str = "head") -> torch.Tensor:
    """Quantize σ per image across channels (the official ``qq`` option).

    ``m = mean_c σ``, ``d = std_c σ``, ``Δσ = s_q·d``: ``σ' = m + clip((round((σ − m)/Δσ + 0.5)
    − 0.5)·Δσ, −Tσ, Tσ)``; ``σ' = m`` when ``Δσ = 0``. ``σ'`` may come out ≤ 0 for small-σ
    channels; the quantizer then outputs the channel mean (as for σ = 0).
    """
    s_q, h = _steps_and_half(qq_bits, step_index, sigma, ())
    m = sigma.mean(dim=1, keepdim=True)
    d = sigma.std(dim=1, keepdim=True) if sigma.shape[1] > 1 else torch.zeros_like(m)
    delta = s_q * d
    ok = torch.isfinite(delta) & (delta > 0)
    safe = torch.where(ok, delta, torch.ones_like(delta))
    r = torch.clamp(torch.round((sigma - m) / safe + 0.5) - 0.5, -h, h)
    return torch.where(ok, m + r * safe, m.expand_as(sigma))


# --------------------------------------------------------------------------- fake-quant
def _daq_params(x: torch.Tensor, bits, branch: str, qq_bits: int, step_index: str):
    """Per-(image, channel) ``(μ, Δ, valid, finite, h)`` of the DAQ quantizer (no gradient):
    ``valid`` channels quantize with step Δ, the others output μ; channels that are not
    ``finite`` pass through."""
    x = x.detach()
    channels = x.shape[1]
    s, h = _steps_and_half(bits, step_index, x, (1, channels, 1, 1))
    mu, sigma = signed_stats(x) if branch == "signed" else relu_stats(x)
    finite = torch.isfinite(mu) & torch.isfinite(sigma)
    spread = sigma > 0  # σ = 0 channels output μ, also when σ is quantized
    raw_sigma = sigma
    if qq_bits:
        sigma = quantize_sigma(torch.where(finite, sigma, torch.zeros_like(sigma)), qq_bits,
                               step_index)
    delta = s * sigma
    valid = finite & spread & (delta > 0) & torch.isfinite(delta)
    safe = torch.where(valid, delta, torch.ones_like(delta))
    zero = torch.zeros_like(mu)
    mu_safe = torch.where(finite, mu, zero)
    # A channel whose output range would overflow the dtype passes through unchanged.
    finite = finite & (_output_bound(branch, mu_safe, raw_sigma, safe * valid, h,
                                     x.shape[-1] * x.shape[-2]) < torch.finfo(x.dtype).max)
    return mu_safe, safe, valid, finite, h


def daq_quantize(x: torch.Tensor, bits: int | torch.Tensor, *, branch: str = "signed",
                 qq_bits: int = 0, step_index: str = "head") -> torch.Tensor:
    """DAQ fake-quantization of an N×C×H×W activation, without gradient (see module doc).

    ``bits`` is an int or a length-C integer tensor (per-channel bits). ``branch`` is
    ``signed`` (μ-centred mid-rise, 2^b levels), ``relu`` (official HEAD post-ReLU:
    ``Δ·round(x/Δ)``, unbounded), ``relu-clipped`` (levels ``0, Δ, …, (2^b − 1)·Δ``) or
    ``relu-initial`` (initial commit: μ-centred, clipped to ``[max(−μ, −T), T + max(T − μ, 0)]``).
    Channels with σ = 0 output their mean; channels whose statistics overflow float
    (|x| ≳ 1e19 in float32) are passed through unchanged.
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown DAQ branch '{branch}'; valid: {', '.join(BRANCHES)}")
    with torch.no_grad():
        x = x.detach()
        mu_safe, safe, valid, finite, h = _daq_params(x, bits, branch, qq_bits, step_index)
        if branch == "signed":
            # in place: ((x − μ)/Δ + 0.5) -> round -> − 0.5 -> clip to ±h -> ·Δ -> + μ
            r = (x - mu_safe).div_(safe).add_(0.5).round_().sub_(0.5)
            r = torch.clamp(r, -h, h) if isinstance(h, torch.Tensor) else r.clamp_(-h, h)
            # σ = 0 (or σ' <= 0): the step is zeroed, so the output is μ
            q = r.mul_(safe * valid).add_(mu_safe)
        elif branch == "relu":
            # official HEAD: T + (round((x − T)/Δ + 0.5) − 0.5)·Δ = Δ·(round(x/Δ − k) + k),
            # k = 2^(b−1) − 1, with both clamps commented out.
            k = h - 0.5
            q = (torch.round(x / safe - k) + k) * safe * valid + mu_safe * ~valid
        elif branch == "relu-clipped":
            levels = torch.clamp(torch.clamp(torch.round(x / safe), min=0), max=2 * h)
            q = levels * safe * valid + mu_safe * ~valid
        else:  # relu-initial
            t = h * safe
            lo = torch.maximum(-mu_safe, -t)
            hi = t + torch.clamp(t - mu_safe, min=0)
            r = (torch.round((x - mu_safe) / safe + 0.5) - 0.5) * safe
            q = mu_safe + torch.minimum(torch.maximum(r, lo), hi) * valid
        return torch.where(finite, q, x)


def daq_codes(x: torch.Tensor, bits: int | torch.Tensor, *, branch: str = "signed",
              qq_bits: int = 0, step_index: str = "head") -> AffineCodes:
    """The integer form of :func:`daq_quantize`: codes and per-(image, channel) steps.

    ``signed``: ``c = clip(round((x − μ)/Δ + ½), −h + ½, h + ½)``, ``x̂ = (c − ½)·Δ + μ``;
    ``relu``: ``c = round(x/Δ − k) + k`` (unbounded, int64), ``x̂ = c·Δ``; ``relu-clipped``:
    ``c = clip(round(x/Δ), 0, 2h)``. Channels with σ = 0 get step 0 and offset μ. The
    ``relu-initial`` branch clips to ``−μ``, which is off the step grid: it has no integer form.
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown DAQ branch '{branch}'; valid: {', '.join(BRANCHES)}")
    if branch == "relu-initial":
        raise ValueError("DAQ branch 'relu-initial' clips to −μ, off the step grid: it has no "
                         "integer form; use 'signed', 'relu' or 'relu-clipped'")
    with torch.no_grad():
        x = x.detach()
        mu, safe, valid, finite, h = _daq_params(x, bits, branch, qq_bits, step_index)
        if not bool(finite.all()):
            raise ValueError("DAQ input has channels whose statistics overflow float: they "
                             "pass through unquantized and have no integer form")
        step = safe * valid
        if branch == "signed":
            c = torch.clamp(torch.round((x - mu) / safe + 0.5), -h + 0.5, h + 0.5)
            return AffineCodes(c.to(torch.int32), step, 0.5, mu)
        offset = mu * ~valid
        if branch == "relu":
            k = h - 0.5
            return AffineCodes((torch.round(x / safe - k) + k).to(torch.int64), step, 0, offset)
        c = torch.clamp(torch.clamp(torch.round(x / safe), min=0), max=2 * h)
        return AffineCodes(c.to(torch.int32), step, 0, offset)


def _output_bound(branch: str, mu: torch.Tensor, sigma: torch.Tensor, delta: torch.Tensor,
                  h, pixels: int) -> torch.Tensor:
    """Per-channel bound on |x̂| (float64, on the N×C×1×1 statistics only)."""
    mu, sigma, delta = mu.double().abs(), sigma.double(), delta.double()
    h = h.double() if isinstance(h, torch.Tensor) else h
    if branch == "signed":
        return mu + h * delta
    if branch == "relu":  # max x <= sqrt(Σx²) = sqrt(n⁺·(σ² + μ²))
        return torch.sqrt((pixels + 1) * (sigma * sigma + mu * mu)) + delta
    if branch == "relu-clipped":
        return 2 * h * delta
    return mu + 2 * h * delta


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` forward, identity gradient to ``x`` (no clipping mask), as the official STE."""
    if not x.requires_grad:
        return q
    return x + (q - x).detach()


def daq_weight_codes(w: torch.Tensor, bits: int | torch.Tensor, *,
                     granularity: str = "per-tensor", step_index: str = "head") -> AffineCodes:
    """The integer form of :func:`daq_weight_quantize`: ``Ŵ = (c − ½)·Δ``."""
    return daq_weight_quantize(w, bits, granularity=granularity, step_index=step_index,
                               codes=True)


def daq_weight_quantize(w: torch.Tensor, bits: int | torch.Tensor, *,
                        granularity: str = "per-tensor", step_index: str = "head",
                        codes: bool = False) -> torch.Tensor:
    """Symmetric mid-rise weight fake-quantization, without gradient.

    ``σ_w`` = std(W) over the tensor (official) or per output channel; ``Δ = s·σ_w``;
    ``Ŵ = clip((round(W/Δ + 0.5) − 0.5)·Δ, −T, T)``: 2^b levels, none at 0. ``bits`` is an
    int or a tensor broadcastable to ``w`` (per-input-channel bits for mixed precision).
    """
    if granularity not in WEIGHT_GRANULARITIES:
        raise ValueError(f"unknown weight granularity '{granularity}'; valid: "
                         f"{', '.join(WEIGHT_GRANULARITIES)}")
    with torch.no_grad():
        w = w.detach()
        shape = bits.shape if isinstance(bits, torch.Tensor) else ()
        s, h = _steps_and_half(bits, step_index, w, shape)
        if granularity == "per-tensor":
            sigma = w.std() if w.numel() > 1 else torch.zeros((), dtype=w.dtype)
        else:
            flat = w.reshape(w.shape[0], -1)
            sigma = (flat.std(dim=1) if flat.shape[1] > 1 else torch.zeros_like(flat[:, 0]))
            sigma = sigma.reshape((-1,) + (1,) * (w.ndim - 1))
        delta = s * sigma
        valid = torch.isfinite(delta) & (delta > 0)
        safe = torch.where(valid, delta, torch.ones_like(delta))
        r = torch.clamp(torch.round(w / safe + 0.5) - 0.5, -h, h)
        return (r * safe * valid) if not codes else AffineCodes(
            (r + 0.5).to(torch.int32), safe * valid, 0.5)


# --------------------------------------------------------------------------- modules
def _bits_summary(bits: torch.Tensor) -> int | str:
    lo, hi = int(bits.min()), int(bits.max())
    if lo == hi:
        return lo
    return f"{lo}-{hi} (avg {float(bits.double().mean()):.1f})"


class DAQActivationQuantizer(Quantizer):
    """Dynamic per-(image, channel) DAQ fake-quantizer for a conv input.

    ``bits`` is a persistent length-C buffer (all equal for uniform-bit DAQ, per channel for
    mixed precision). ``branch`` is chosen by the pass from the graph (post-ReLU or not).
    """

    kind = "daq"

    def __init__(self, channels: int, bits: int | torch.Tensor, *, branch: str = "signed",
                 qq_bits: int = 0, step_index: str = "head"):
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"unknown DAQ branch '{branch}'; valid: {', '.join(BRANCHES)}")
        if step_index not in STEP_INDICES:
            raise ValueError(f"unknown step index '{step_index}'; valid: {', '.join(STEP_INDICES)}")
        self.channels = channels
        self.branch = branch
        self.qq_bits = qq_bits
        self.step_index = step_index
        self.register_buffer("bits", torch.empty(channels, dtype=torch.int64))
        self.set_bits(bits)

    def set_bits(self, bits: int | torch.Tensor) -> None:
        check_bits(bits)
        if self.qq_bits:
            check_bits(self.qq_bits)
        with torch.no_grad():
            self.bits.copy_(torch.as_tensor(bits, dtype=torch.int64).expand(self.channels))

    def _bits_arg(self) -> int | torch.Tensor:
        lo, hi = int(self.bits.min()), int(self.bits.max())  # uniform bits: Python scalars
        return lo if lo == hi else self.bits

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        q = daq_quantize(x, self._bits_arg(), branch=self.branch, qq_bits=self.qq_bits,
                         step_index=self.step_index)
        return ste(x, q)

    def integer_codes(self, x: torch.Tensor) -> AffineCodes:
        return daq_codes(x, self._bits_arg(), branch=self.branch, qq_bits=self.qq_bits,
                         step_index=self.step_index)

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": _bits_summary(self.bits),
                "granularity": "per-image-channel", "mode": "dynamic", "branch": self.branch,
                "qq_bits": self.qq_bits or None, "step_index": self.step_index}

    def check(self) -> None:
        try:
            check_bits(self.bits)
            if self.qq_bits:
                check_bits(self.qq_bits)
        except ValueError as exc:
            raise ValueError(f"DAQ activation quantizer: {exc}") from None

    def extra_repr(self) -> str:
        d = self.describe()
        return f"channels={self.channels}, bits={d['bits']}, branch={self.branch}, " \
               f"qq_bits={self.qq_bits}, step_index={self.step_index}"


def weight_bits_map(channel_bits: torch.Tensor, out_channels: int, groups: int) -> torch.Tensor:
    """Per-input-channel bits (length C_in) -> the O×(C_in/g)×1×1 map the weight sees."""
    c_in = channel_bits.numel()
    per_group = c_in // groups
    o_g = out_channels // groups
    grid = channel_bits.reshape(groups, 1, per_group).expand(groups, o_g, per_group)
    return grid.reshape(out_channels, per_group, 1, 1)


class DAQWeightQuantizer(Quantizer):
    """DAQ weight fake-quantizer (σ-scaled symmetric mid-rise), recomputed from the weight.

    ``bits`` is a persistent O×(C_in/g)×1×1 buffer so that mixed precision can give each
    input channel's weight slice the bits of that channel's activation.
    """

    kind = "daq"

    def __init__(self, weight_shape: Sequence[int], bits: int | torch.Tensor, *,
                 granularity: str = "per-tensor", step_index: str = "head", groups: int = 1):
        super().__init__()
        if granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"unknown weight granularity '{granularity}'; valid: "
                             f"{', '.join(WEIGHT_GRANULARITIES)}")
        if step_index not in STEP_INDICES:
            raise ValueError(f"unknown step index '{step_index}'; valid: {', '.join(STEP_INDICES)}")
        self.weight_granularity = granularity
        self.step_index = step_index
        self.groups = groups
        self.out_channels, per_group = int(weight_shape[0]), int(weight_shape[1])
        self.register_buffer("bits", torch.empty(self.out_channels, per_group, 1, 1,
                                                 dtype=torch.int64))
        self.set_bits(bits)

    def set_bits(self, bits: int | torch.Tensor) -> None:
        """An int, or per-input-channel bits (length C_in = (C_in/g)·g)."""
        check_bits(bits)
        with torch.no_grad():
            if isinstance(bits, torch.Tensor) and bits.ndim == 1:
                bits = weight_bits_map(bits, self.out_channels, self.groups)
            self.bits.copy_(torch.as_tensor(bits, dtype=torch.int64).expand_as(self.bits))

    def _bits_arg(self) -> int | torch.Tensor:
        lo, hi = int(self.bits.min()), int(self.bits.max())
        return lo if lo == hi else self.bits

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        q = daq_weight_quantize(w, self._bits_arg(), granularity=self.weight_granularity,
                                step_index=self.step_index)
        return ste(w, q)

    def integer_codes(self, w: torch.Tensor) -> AffineCodes:
        """Mid-rise codes ``c = clip(round(W/Δ + ½), −h + ½, h + ½)``, ``Ŵ = (c − ½)·Δ``."""
        return daq_weight_codes(w, self._bits_arg(), granularity=self.weight_granularity,
                                step_index=self.step_index)

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": _bits_summary(self.bits),
                "granularity": self.weight_granularity, "mode": "static"}

    def check(self) -> None:
        try:
            check_bits(self.bits)
        except ValueError as exc:
            raise ValueError(f"DAQ weight quantizer: {exc}") from None


# --------------------------------------------------------------------------- mixed precision
def _padding(conv_padding, kernel_size, dilation) -> tuple[int, int]:
    if isinstance(conv_padding, str):
        if conv_padding == "valid":
            return (0, 0)
        return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))  # 'same'
    return tuple(conv_padding)


def channel_weight_vectors(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """C_in × (O/g) × (k·k): the weights that input channel ``c`` feeds (its group's outputs)."""
    out_channels, per_group = weight.shape[:2]
    o_g = out_channels // groups
    w = weight.reshape(groups, o_g, per_group, -1).permute(0, 2, 1, 3)
    return w.reshape(groups * per_group, o_g, -1)


def channel_output_errors(x: torch.Tensor, weight: torch.Tensor, bits_choices: Sequence[int], *,
                          groups: int = 1, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          branch: str = "signed", qq_bits: int = 0, step_index: str = "head",
                          weight_mode: str = "match", weight_bits: int = 4,
                          weight_granularity: str = "per-tensor",
                          weight_step_index: str = "head", measure: str = "output",
                          output_gains: torch.Tensor | None = None,
                          dc_gains: torch.Tensor | None = None,
                          max_positions: int = 4096) -> torch.Tensor:
    """Squared conv-output error when only channel ``c`` is quantized at ``b`` bits.

    Returns an ``len(bits_choices) × C_in`` float64 tensor ``E[b, c] = ||y_b^(c) − y||²``
    (summed over the batch), where ``y_b^(c)`` is the conv output (bias excluded) with the
    activation channel ``c`` DAQ-quantized at ``b`` bits and, with ``weight_mode = "match"``,
    its weight slice ``W[:, c]`` too (``"fixed"``: weights at ``weight_bits`` for all channels,
    so only the activation error depends on ``b``).

    Exact without running C convolutions: with ``z_c`` the k×k patches of the channel's
    error (stacked with the patches of ``x_c`` in match mode) and ``V_c`` the weights the
    channel feeds, ``E = Σ_ij (V_cᵀ V_c)_ij · (Σ_p z_c z_cᵀ)_ij`` (a Gram trick, computed
    block-wise). The sum
    over output positions ``p`` is exact up to ``max_positions`` positions per call and
    otherwise a uniform random sample of that many (fixed seed), rescaled. ``measure = "input"`` returns the
    plain activation error ``Σ (x̂_c − x_c)²`` instead (ignores the weights).
    ``output_gains`` (length O) weights each output channel's squared error, e.g. by
    :func:`downstream_gains`, so that ``E`` estimates the error at the network output;
    with ``dc_gains`` the error's per-image spatial mean (DC) is weighted by those instead
    (a spatially constant error propagates differently from a white one).
    """
    x = x.detach().float()
    weight = weight.detach().float()
    n, c_in = x.shape[:2]
    geometry = (tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation))
    sample = None if measure == "input" else _sample_positions(x.shape, *geometry, max_positions)
    results = []
    if weight_mode == "fixed":
        fixed_w = daq_weight_quantize(weight, weight_bits, granularity=weight_granularity,
                                      step_index=weight_step_index)
    x_patches = None
    for bits in bits_choices:
        err = daq_quantize(x, bits, branch=branch, qq_bits=qq_bits, step_index=step_index) - x
        if measure == "input":
            results.append(err.double().pow(2).sum(dim=(0, 2, 3)))
            continue
        index, scale = sample
        z = _patches(err, geometry, index)  # C × k² × P
        r_ee = torch.bmm(z, z.transpose(1, 2)).double()
        if weight_mode == "match":
            # ŷ − y = Ŵ⋆e + (Ŵ − W)⋆x: the Gram of [e; x] against that of [Ŵ; Ŵ − W]
            w_hat = daq_weight_quantize(weight, bits, granularity=weight_granularity,
                                        step_index=weight_step_index)
            if x_patches is None:
                x_patches = _patches(x, geometry, index)
                r_xx = torch.bmm(x_patches, x_patches.transpose(1, 2)).double()
            v_hat = channel_weight_vectors(_weighted(w_hat, output_gains), groups).double()
            v_err = channel_weight_vectors(_weighted(w_hat - weight, output_gains),
                                           groups).double()
            r_ex = torch.bmm(z, x_patches.transpose(1, 2)).double()
            energy = ((v_hat.transpose(1, 2) @ v_hat) * r_ee).sum(dim=(1, 2)) \
                + 2 * ((v_hat.transpose(1, 2) @ v_err) * r_ex).sum(dim=(1, 2)) \
                + ((v_err.transpose(1, 2) @ v_err) * r_xx).sum(dim=(1, 2))
        else:
            v = channel_weight_vectors(_weighted(fixed_w, output_gains), groups).double()
            energy = ((v.transpose(1, 2) @ v) * r_ee).sum(dim=(1, 2))
        energy = energy * scale
        if output_gains is not None and dc_gains is not None:
            energy = energy + _dc_correction(err, x, weight, w_hat if weight_mode == "match"
                                             else fixed_w, weight_mode, groups, output_gains,
                                             dc_gains, positions=index[0].numel() * scale / n)
        results.append(energy)
    return torch.stack(results)


def _dc_correction(err, x, weight, w_hat, weight_mode, groups, gains, dc_gains, positions):
    """``Σ_o (g_dc − g)_o · D_o,c``: re-weight the DC part ``D`` of each channel's output error.

    The DC of channel ``c``'s error at output ``o`` in image ``n`` is (borders ignored)
    ``a = (ΣŴ_o,c)·mean(e_n,c) + (Σ(Ŵ − W)_o,c)·mean(x_n,c)``; ``D = positions·Σ_n a²``.
    """
    e_mean = err.double().mean(dim=(2, 3))  # N × C
    a = e_mean[:, :, None] * channel_weight_vectors(w_hat, groups).double().sum(-1)[None]
    if weight_mode == "match":
        x_mean = x.double().mean(dim=(2, 3))
        a = a + x_mean[:, :, None] * channel_weight_vectors(w_hat - weight, groups).double().sum(-1)[None]
    dc_energy = positions * a.pow(2).sum(0)  # C × O/g
    delta = (dc_gains.double() - gains.double()).reshape(-1, 1, 1, 1).to(dc_energy.device)
    delta = delta.expand(-1, weight.shape[1], 1, 1)
    per_output = channel_weight_vectors(delta, groups)[..., 0]  # C × O/g: the gains c feeds
    return (per_output * dc_energy).sum(dim=1)


def _weighted(weight: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """Scale output channel ``o`` by ``sqrt(gains[o])`` (squared errors then carry ``gains``)."""
    if gains is None:
        return weight
    gains = gains.to(device=weight.device, dtype=weight.dtype)
    return weight * gains.clamp(min=0).sqrt().reshape(-1, 1, 1, 1)


def downstream_gains(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], batches,
                     probes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """How much a perturbation of each output channel of each node reaches the network output.

    For node output ``z`` and network output ``y``, ``g_o = E_p E_v[(∂(vᵀy)/∂z_{o,p})²]``
    with ``v ~ N(0, I)`` (Hutchinson's estimate of the diagonal of ``JᵀJ``, averaged over
    positions ``p`` and calibration batches): a white error of energy ``ε`` on channel ``o``
    adds about ``g_o·ε`` to the squared error of ``y``. The second gain is the same for a
    spatially constant error: ``g_dc,o = E_v[(Σ_p ∂(vᵀy)/∂z_{o,p})²] / P``. Returns
    ``{node name: (g, g_dc)}``; the float network runs forward and backward ``probes``
    times per batch.
    """
    wanted = {n.name for n in nodes}
    generator = torch.Generator().manual_seed(seed)
    gains: dict[str, torch.Tensor] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted:
                captured[node.name] = out
            return out

    was_training = gm.training
    gm.eval()
    for batch in batches:
        for _ in range(probes):
            captured: dict[str, torch.Tensor] = {}
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in batch]
                out = Capture(gm).run(*inputs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                v = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
                names = [n for n in captured if captured[n].requires_grad]
                grads = torch.autograd.grad((out * v).sum(), [captured[n] for n in names],
                                            allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is None:
                    continue
                grad = grad.detach().double().cpu()
                white = grad.pow(2).mean(dim=(0, 2, 3))
                dc = grad.sum(dim=(2, 3)).pow(2).mean(0) / (grad.shape[2] * grad.shape[3])
                old = gains.get(name)
                gains[name] = (white, dc) if old is None else (old[0] + white, old[1] + dc)
    gm.train(was_training)
    count = max(len(batches) * probes, 1)
    return {name: (w / count, d / count) for name, (w, d) in gains.items()}


def _sample_positions(shape, kernel, stride, padding, dilation, max_positions: int):
    """Output positions (n, i, j) to evaluate: all of them, or ``max_positions`` drawn
    uniformly (fixed seed), with the factor that rescales sums to all positions."""
    n, _, h, w = shape
    ho = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = n * ho * wo
    if total <= max_positions:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:max_positions]
    index = (flat // (ho * wo), (flat // wo) % ho, flat % wo)
    return index, total / flat.numel()


def _patches(t: torch.Tensor, geometry, index) -> torch.Tensor:
    """The k×k input patches of ``t`` at output positions ``index``: C × k² × P."""
    kernel, stride, padding, dilation = geometry
    padded = F.pad(t, (padding[1], padding[1], padding[0], padding[0]))
    n_idx, i_idx, j_idx = index
    rows = i_idx[None, :] * stride[0] + (torch.arange(kernel[0]) * dilation[0])[:, None]
    cols = j_idx[None, :] * stride[1] + (torch.arange(kernel[1]) * dilation[1])[:, None]
    _, _, hp, wp = padded.shape
    linear = (n_idx[None, None, :] * hp + rows[:, None, :]) * wp + cols[None, :, :]  # kh×kw×P
    linear = linear.to(t.device)
    flat = padded.transpose(0, 1).reshape(t.shape[1], -1)  # C × (N·Hp·Wp)
    return flat.index_select(1, linear.reshape(-1)).reshape(t.shape[1], kernel[0] * kernel[1], -1)


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


class DAQSensitivityObserver(Observer):
    """Identity module that accumulates, for one conv input, the output errors
    ``E[b, c]`` of :func:`channel_output_errors` over the calibration batches (weighted by
    ``output_gains`` when given), and the conv's output energy ``Σ y²``."""

    kind = "daq-sensitivity"

    def __init__(self, node_name: str, conv: torch.nn.Conv2d, bits_choices: Sequence[int], *,
                 branch: str = "signed", qq_bits: int = 0, step_index: str = "head",
                 weight_mode: str = "match", weight_bits: int = 4,
                 weight_granularity: str = "per-tensor", weight_step_index: str = "head",
                 measure: str = "output", output_gains: torch.Tensor | None = None,
                 dc_gains: torch.Tensor | None = None, max_positions: int = 4096):
        super().__init__(node_name)
        self.bits_choices = tuple(int(b) for b in bits_choices)
        self.branch = branch
        self.geometry = dict(groups=conv.groups, stride=tuple(conv.stride),
                             dilation=tuple(conv.dilation),
                             padding=_padding(conv.padding, conv.kernel_size, conv.dilation))
        self.options = dict(branch=branch, qq_bits=qq_bits, step_index=step_index,
                            weight_mode=weight_mode, weight_bits=weight_bits,
                            weight_granularity=weight_granularity,
                            weight_step_index=weight_step_index, measure=measure,
                            max_positions=max_positions)
        # Transient copies: the observer is removed by the daq pass.
        self.register_buffer("weight", conv.weight.detach().clone(), persistent=False)
        for name, gains in (("output_gains", output_gains), ("dc_gains", dc_gains)):
            self.register_buffer(name, None if gains is None else gains.detach().double().clone(),
                                 persistent=False)
        self.errors: torch.Tensor | None = None
        self.output_energy = 0.0
        self.macs_per_channel = 0

    def observe(self, x: torch.Tensor) -> None:
        errors = channel_output_errors(x, self.weight, self.bits_choices, **self.geometry,
                                       output_gains=self.output_gains, dc_gains=self.dc_gains,
                                       **self.options)
        errors = errors.cpu()
        self.errors = errors if self.errors is None else self.errors + errors
        y = F.conv2d(x, self.weight, None, self.geometry["stride"], self.geometry["padding"],
                     self.geometry["dilation"], self.geometry["groups"])
        self.output_energy += float(y.double().pow(2).sum())
        # multiply-accumulates per image that each input channel feeds (for bit budgets per MAC)
        self.macs_per_channel = (self.weight.shape[0] // self.geometry["groups"]) \
            * self.weight.shape[2] * self.weight.shape[3] * y.shape[2] * y.shape[3]

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": "observer", "batches": self.batches,
                "bits": "/".join(map(str, self.bits_choices))}
