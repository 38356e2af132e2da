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
  ``σ_w = std(W)`` per tensor (official) or per output channel (fxquant/quant/daq_weights.py).
* **step multipliers** ``γ`` (1 = official): per channel for activations, per tensor or
  output channel for weights, ``Δ = s·σ·γ``; the ``reconstruct`` pass learns them (LSQ's step
  gradient, :func:`step_gradient`).
* both use a straight-through estimator with an identity gradient (no clipping mask) and
  detached statistics, so quantization-aware training can run through them.
* **mixed precision** (the paper's abstract; absent from the official code): bits per
  (layer, input channel), chosen from calibration data by :func:`allocate_bits` on the
  output-error sensitivities that :class:`DAQSensitivityObserver` measures.

Every function works on a per-channel ``bits`` tensor (vectorised: no loop over channels),
so mixed precision runs through the same quantizer as uniform-bit DAQ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from fxquant.quant.base import (
    AffineCodes,
    Quantizer,
    StepMultiplierMixin,
    check_multiplier,
)

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


def steps_and_half(bits: int | torch.Tensor, step_index: str, like: torch.Tensor,
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
    s_q, h = steps_and_half(qq_bits, step_index, sigma, ())
    m = sigma.mean(dim=1, keepdim=True)
    d = sigma.std(dim=1, keepdim=True) if sigma.shape[1] > 1 else torch.zeros_like(m)
    delta = s_q * d
    ok = torch.isfinite(delta) & (delta > 0)
    safe = torch.where(ok, delta, torch.ones_like(delta))
    r = torch.clamp(torch.round((sigma - m) / safe + 0.5) - 0.5, -h, h)
    return torch.where(ok, m + r * safe, m.expand_as(sigma))


# --------------------------------------------------------------------------- fake-quant
def _daq_params(x, bits, branch: str, qq_bits: int, step_index: str,
                multiplier: torch.Tensor | None = None):
    """Per-(image, channel) ``(μ, Δ, valid, finite, h)`` of the DAQ quantizer (no gradient):
    ``valid`` channels quantize with step Δ, the others output μ; channels that are not
    ``finite`` pass through. ``multiplier`` (length C, learned by reconstruction) scales each
    channel's step, ``Δ = s·σ·γ_c``; 1 is the official quantizer, bit for bit. ``x`` may be a
    list of N×C_i×H×W pieces: the parameters of their channel concatenation, without building
    it (the statistics are per channel, so each piece's are its own)."""
    pieces = [p.detach() for p in x] if isinstance(x, (list, tuple)) else [x.detach()]
    stats = [signed_stats(p) if branch == "signed" else relu_stats(p) for p in pieces]
    mu, sigma = (torch.cat(t, 1) for t in zip(*stats)) if len(stats) > 1 else stats[0]
    x = pieces[0]  # dtype, device and pixel count
    channels = mu.shape[1]
    s, h = steps_and_half(bits, step_index, x, (1, channels, 1, 1))
    finite = torch.isfinite(mu) & torch.isfinite(sigma)
    spread = sigma > 0  # σ = 0 channels output μ, also when σ is quantized
    raw_sigma = sigma
    if qq_bits:
        sigma = quantize_sigma(torch.where(finite, sigma, torch.zeros_like(sigma)), qq_bits,
                               step_index)
    delta = s * sigma
    if multiplier is not None:
        delta = delta * multiplier.detach().to(x.dtype).view(1, channels, 1, 1)
    valid = finite & spread & (delta > 0) & torch.isfinite(delta)
    safe = torch.where(valid, delta, torch.ones_like(delta))
    zero = torch.zeros_like(mu)
    mu_safe = torch.where(finite, mu, zero)
    # A channel whose output range would overflow the dtype passes through unchanged.
    finite = finite & (_output_bound(branch, mu_safe, raw_sigma, safe * valid, h,
                                     x.shape[-1] * x.shape[-2]) < torch.finfo(x.dtype).max)
    return mu_safe, safe, valid, finite, h


def daq_quantize(x: torch.Tensor, bits: int | torch.Tensor, *, branch: str = "signed",
                 qq_bits: int = 0, step_index: str = "head",
                 multiplier: torch.Tensor | None = None) -> torch.Tensor:
    """DAQ fake-quantization of an N×C×H×W activation, without gradient (see module doc).

    ``bits`` is an int or a length-C integer tensor (per-channel bits). ``branch`` is
    ``signed`` (μ-centred mid-rise, 2^b levels), ``relu`` (official HEAD post-ReLU:
    ``Δ·round(x/Δ)``, unbounded), ``relu-clipped`` (levels ``0, Δ, …, (2^b − 1)·Δ``) or
    ``relu-initial`` (initial commit: μ-centred, clipped to ``[max(−μ, −T), T + max(T − μ, 0)]``).
    Channels with σ = 0 output their mean; channels whose statistics overflow float
    (|x| ≳ 1e19 in float32) are passed through unchanged. ``multiplier``: per-channel step
    factors (:func:`_daq_params`).
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown DAQ branch '{branch}'; valid: {', '.join(BRANCHES)}")
    with torch.no_grad():
        x = x.detach()
        return _levels(x, _daq_params(x, bits, branch, qq_bits, step_index, multiplier), branch)


def _levels(x: torch.Tensor, params: tuple, branch: str) -> torch.Tensor:
    """:func:`daq_quantize`'s output from its :func:`_daq_params` (no gradient)."""
    with torch.no_grad():
        mu_safe, safe, valid, finite, h = params
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
              qq_bits: int = 0, step_index: str = "head",
              multiplier: torch.Tensor | None = None) -> AffineCodes:
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
        mu, safe, valid, finite, h = _daq_params(x, bits, branch, qq_bits, step_index,
                                                 multiplier)
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


def step_gradient(x: torch.Tensor, q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                  multiplier: torch.Tensor, shape) -> torch.Tensor:
    """A term that is exactly 0 forward and gives ``multiplier`` (γ, ``Δ = Δ₀·γ``) LSQ's
    step gradient: ``∂x̂/∂Δ = round(x_n) − x_n`` where ``x`` lies inside the grid (``|x̂ − x|
    <= Δ/2``), the clipped level ``(x̂ − offset)/Δ`` outside; 0 where the step is 0. Added to
    :func:`ste`'s output it leaves the identity gradient to ``x`` as it is."""
    q, x = q.detach(), x.detach()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    inside = (q - x).abs() <= 0.5 * safe * (1 + 1e-6)
    grad = torch.where(inside, (q - x) / safe, (q - offset) / safe) * (step > 0)
    gamma = multiplier.view(shape)
    return grad * step * (gamma / gamma.detach() - 1)


# --------------------------------------------------------------------------- modules
def bits_summary(bits: torch.Tensor) -> int | str:
    lo, hi = int(bits.min()), int(bits.max())
    if lo == hi:
        return lo
    return f"{lo}-{hi} (avg {float(bits.double().mean()):.1f})"


class DAQActivationQuantizer(StepMultiplierMixin, Quantizer):
    """Dynamic per-(image, channel) DAQ fake-quantizer for a conv input.

    ``bits`` is a persistent length-C buffer (all equal for uniform-bit DAQ, per channel for
    mixed precision). ``branch`` is chosen by the pass from the graph (post-ReLU or not).
    ``step_multiplier`` (length C, 1 = the official quantizer) scales each channel's step;
    reconstruction learns it (``trainable_parameters``, LSQ's step gradient).
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
        self.init_step_multiplier(channels)
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
        gamma = self.step_multiplier
        with torch.no_grad():  # daq_quantize's steps, kept for the step gradient
            params = _daq_params(x.detach(), self._bits_arg(), self.branch, self.qq_bits,
                                 self.step_index, gamma)
            q = _levels(x.detach(), params, self.branch)
        out = ste(x, q)
        if gamma.requires_grad and torch.is_grad_enabled():
            mu, safe, valid, _, _ = params
            offset = mu if self.branch in ("signed", "relu-initial") else torch.zeros_like(mu)
            out = out + step_gradient(x, q, safe * valid, offset, gamma,
                                      (1, self.channels, 1, 1))
        return out

    def integer_codes(self, x: torch.Tensor) -> AffineCodes:
        return daq_codes(x, self._bits_arg(), branch=self.branch, qq_bits=self.qq_bits,
                         step_index=self.step_index, multiplier=self.step_multiplier)

    def describe(self) -> dict:
        info = {"kind": self.kind, "bits": bits_summary(self.bits),
                "granularity": "per-image-channel", "mode": "dynamic", "branch": self.branch,
                "qq_bits": self.qq_bits or None, "step_index": self.step_index}
        return self.with_multiplier(info)

    def check(self) -> None:
        try:
            check_bits(self.bits)
            if self.qq_bits:
                check_bits(self.qq_bits)
        except ValueError as exc:
            raise ValueError(f"DAQ activation quantizer: {exc}") from None
        check_multiplier(self.step_multiplier, "DAQ activation quantizer")

    def extra_repr(self) -> str:
        d = self.describe()
        return f"channels={self.channels}, bits={d['bits']}, branch={self.branch}, " \
               f"qq_bits={self.qq_bits}, step_index={self.step_index}"
