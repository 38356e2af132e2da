"""ODM v2's layer-wise weight-clipping correction (WCC): a symmetric per-tensor weight grid
whose range follows the weights during training, ``u_w = f(W)·γ_w`` with ``f`` the
``percentile``-th percentile of ``|W|`` (recomputed on every call, no gradient) and ``γ_w`` one
learnable scalar per layer, initialised to 1 (METHODS.md §5.3; whether ``f`` is taken of ``W``
or ``|W|`` is not stated: |W|, so that the range is symmetric)."""

from __future__ import annotations

import torch

from fxquant.quant.base import AffineCodes, Quantizer
from fxquant.quant.uniform import EPS, fake_quantize, symmetric_range


class ClippedWeightQuantizer(Quantizer):
    kind = "wcc"
    symmetric = True  # levels ±(2^(b−1) − 1), zero point 0: lowers to int8 without centring

    def __init__(self, bits: int, percentile: float = 99.0):
        super().__init__()
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile = {percentile} must lie in (0, 100]")
        self.bits, self.percentile = bits, percentile
        self.qmin, self.qmax = symmetric_range(bits)
        self.gamma = torch.nn.Parameter(torch.ones(()))

    def scale_for(self, w: torch.Tensor) -> torch.Tensor:
        """``s = f(W)·γ / q_max``; the percentile carries no gradient, γ does."""
        f = torch.quantile(w.detach().abs().flatten().float(), self.percentile / 100.0)
        return torch.clamp(f * self.gamma / self.qmax, min=EPS)

    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale_for(w), torch.zeros(()), self.qmin, self.qmax)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        self.gamma.requires_grad_(True)
        return [self.gamma]

    def integer_codes(self, w: torch.Tensor) -> AffineCodes:
        with torch.no_grad():
            scale = self.scale_for(w)
            q = torch.clamp(torch.round(w.detach() / scale), self.qmin, self.qmax).to(torch.int32)
        return AffineCodes(q, scale, torch.zeros(()), None, self.qmin, self.qmax)

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "granularity": "per-tensor",
                "mode": "static", "symmetric": True, "percentile": self.percentile,
                "gamma": round(float(self.gamma), 4)}

    def check(self) -> None:
        if not (torch.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"wcc quantizer has gamma = {float(self.gamma)}; it must be > 0")
