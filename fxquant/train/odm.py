"""ODM's cooperative regularization (docs/methods/odm.md): a feature regularizer whose gradient
is applied only as far as it agrees with the reconstruction gradient.

- **v1** (the seed paper): the *variance* of the features each static activation quantizer
  sees, across images, per channel — ``L_V = Σ_i mean_c [Var_n μ_{n,c} + Var_n σ_{n,c}] / w_i²``
  with ``w_i`` the quantizer's range width (the square of ``inject-offsets``' mismatch score,
  so selection and regularization measure one thing). The reviews describe the cooperation as
  "computing the signs of gradients": ``g = g_R + λ·g_V ⊙ [sign g_V = sign g_R]`` elementwise.
- **v2** (ECCV 2024): the *mismatch* ``L_M = Σ_i ‖X_i − q(X_i)‖₂`` between each quantizer's
  input and its fake-quantized value, with ``g = g_R + λ·(cos(g_R, g_M) + 1)/2 · g_M``; the
  cosine is over all trained parameters at once (``granularity="global"``, default; the
  paper does not say) or per parameter tensor (``"tensor"``).

:class:`FeatureTap` collects the quantizer inputs of one forward pass (with their graph, so
the regularizers are differentiable); :func:`cooperative_gradients` writes the combined
gradient into ``.grad`` for the optimizer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fxquant.quant import Quantizer
from fxquant.quant.offsets import quantizer_range

MODES = ("v1", "v2")
GRANULARITIES = ("global", "tensor")


def static_quantizers(model: nn.Module) -> list[Quantizer]:
    """The activation quantizers with a static range (weight quantizers excluded)."""
    return [m for name, m in model.named_modules() if isinstance(m, Quantizer)
            and not name.endswith("weight_quantizer") and quantizer_range(m) is not None]


class FeatureTap:
    """``with FeatureTap(model) as tap: out = model(x)`` leaves ``tap.features``: the input
    of every static activation quantizer (those with a range), in call order, with ``tap.
    quantizers`` beside them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.features: list[torch.Tensor] = []
        self.quantizers: list[Quantizer] = []
        self._handles = []

    def __enter__(self) -> "FeatureTap":
        self._handles = [m.register_forward_pre_hook(self._hook) for m in static_quantizers(self.model)]
        return self

    def _hook(self, module, args) -> None:
        self.features.append(args[0])
        self.quantizers.append(module)

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def variance_loss(features: Sequence[torch.Tensor], quantizers: Sequence[Quantizer]) -> torch.Tensor:
    """v1's ``L_V`` (module docstring); 0 for a batch of one image."""
    total = features[0].new_zeros(())
    for x, q in zip(features, quantizers):
        if x.shape[0] < 2:
            continue
        std, mean = torch.std_mean(x.flatten(2), dim=2, correction=0)
        width = quantizer_range(q)
        total = total + (mean.var(dim=0) + std.var(dim=0)).mean() / width ** 2
    return total


def mismatch_loss(features: Sequence[torch.Tensor], quantizers: Sequence[Quantizer]) -> torch.Tensor:
    """v2's ``L_M = Σ_i ‖X_i − q(X_i)‖₂`` (through the quantizers' straight-through rounding,
    so it moves out-of-range values and the learned ranges)."""
    total = features[0].new_zeros(())
    for x, q in zip(features, quantizers):
        total = total + torch.linalg.vector_norm(x - q.fake_quant(x))
    return total


def cooperative_gradients(recon_loss: torch.Tensor, reg_loss: torch.Tensor,
                          params: Sequence[torch.Tensor], *, mode: str = "v2",
                          weight: float = 1e-5, granularity: str = "global",
                          average=None) -> dict:
    """Set ``p.grad`` of every parameter to the cooperative combination of the two losses'
    gradients (module docstring); returns ``{"agreement": ...}`` (v1: the fraction of
    agreeing signs; v2: the similarity ``(cos + 1)/2``) for logging. ``average`` (DDP: the
    step context's mean over ranks) makes both gradients global before they are compared."""
    if mode not in MODES or granularity not in GRANULARITIES:
        raise ValueError(f"mode must be one of {MODES} and granularity one of {GRANULARITIES}")
    params = list(params)
    g_r = torch.autograd.grad(recon_loss, params, retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(reg_loss, params, allow_unused=True)
    g_r = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_r)]
    g_m = [torch.zeros_like(p) if g is None else g for p, g in zip(params, g_m)]
    if average is not None:
        g_r, g_m = average(g_r), average(g_m)
    if mode == "v1":
        agree = [torch.sign(a) == torch.sign(b) for a, b in zip(g_r, g_m)]
        combined = [a + weight * b * m for a, b, m in zip(g_r, g_m, agree)]
        count = sum(int(m.sum()) for m in agree)
        agreement = count / max(1, sum(m.numel() for m in agree))
    elif granularity == "global":
        sim = (_cosine(torch.cat([g.flatten() for g in g_r]),
                       torch.cat([g.flatten() for g in g_m])) + 1) / 2
        combined = [a + weight * sim * b for a, b in zip(g_r, g_m)]
        agreement = float(sim)
    else:
        sims = [(_cosine(a.flatten(), b.flatten()) + 1) / 2 for a, b in zip(g_r, g_m)]
        combined = [a + weight * s * b for a, b, s in zip(g_r, g_m, sims)]
        agreement = float(torch.stack(sims).mean()) if sims else 1.0
    for p, g in zip(params, combined):
        p.grad = g.detach()
    return {"agreement": agreement}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a, b), and 0 (similarity ½) when either is the zero vector."""
    norm = torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b)
    if not norm > 0:
        return a.new_zeros(())
    return torch.clamp((a @ b) / norm, -1.0, 1.0)  # rounding can leave |cos| a hair above 1


class ODMRegularizer:
    """The ``regularizers`` hook of ``fxquant train`` (fxquant/train/hooks.py): collects the
    static activation quantizers' inputs during each training forward (hooks installed once,
    features kept only while gradients are on) and returns v1's ``L_V`` or v2's ``L_M``."""

    def __init__(self, model: nn.Module, version: str, weight: float = 1.0):
        if version not in MODES:
            raise ValueError(f"ODM version '{version}' unknown; valid: {', '.join(MODES)}")
        self.version = version
        self.name = "odm_variance" if version == "v1" else "odm_mismatch"
        self.weight = weight  # λ: the value returned is the term as it enters the objective
        self.features: list[torch.Tensor] = []
        self.quantizers: list[Quantizer] = []
        self.handles = [m.register_forward_pre_hook(self._keep) for m in static_quantizers(model)]

    def _keep(self, module, args) -> None:
        if torch.is_grad_enabled():  # training forwards only, not evaluation
            self.features.append(args[0])
            self.quantizers.append(module)

    def __call__(self, ctx) -> torch.Tensor:
        features, quantizers = self.features, self.quantizers
        self.features, self.quantizers = [], []
        if not features:
            return ctx.recon_loss.new_zeros(())
        loss = variance_loss if self.version == "v1" else mismatch_loss
        return self.weight * loss(features, quantizers)


class CooperativeBackward:
    """The ``backward`` hook: the reconstruction terms' gradient plus the regularizer's,
    cooperatively combined (:func:`cooperative_gradients`)."""

    name = "odm_cooperative"

    def __init__(self, regularizer: ODMRegularizer, granularity: str = "global"):
        self.regularizer, self.granularity = regularizer, granularity

    def __call__(self, ctx, parts: dict, params) -> dict:
        recon = sum(v for k, v in parts.items() if k != self.regularizer.name)
        reg = parts[self.regularizer.name]
        if not reg.requires_grad:  # no feature this step: plain reconstruction
            for p, g in zip(params, torch.autograd.grad(recon, params, allow_unused=True)):
                p.grad = torch.zeros_like(p) if g is None else g
            return {"agreement": float("nan")}
        # λ is inside ``reg`` already (ODMRegularizer), so the combination weight is 1
        return cooperative_gradients(recon, reg, params, mode=self.regularizer.version,
                                     weight=1.0, granularity=self.granularity,
                                     average=ctx.average)


def odm_hooks(model: nn.Module, options) -> tuple[list, CooperativeBackward]:
    """``(regularizers, backward)`` for ``fxquant train`` from a recipe's ODMOptions."""
    regularizer = ODMRegularizer(model, options.version, options.reg_weight)
    return [regularizer], CooperativeBackward(regularizer, options.granularity)
