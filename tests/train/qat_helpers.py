"""Shared by the QAT tests and the torchrun worker: a tiny SR net, its compiled W4A4 graph,
synthetic HR images and the settings of a short run (milliseconds per step)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import fxquant
from fxquant.train.config import QATConfig
from fxquant.train.data import PatchSampler


class Tiny(nn.Module):
    """conv-ReLU-conv (+ optional BatchNorm) with a residual, pixel shuffle x2."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1),
                                  nn.BatchNorm2d(8) if bn else nn.Identity(), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.tail = nn.Conv2d(8, 12, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        return nn.functional.pixel_shuffle(self.tail(h + self.body(h)), 2)


def float_model(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Tiny(bn)
    if bn:  # non-trivial running statistics
        model.body[1].running_mean.uniform_(-0.1, 0.1)
        model.body[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def compiled(model: nn.Module, recipe: str = "minmax-w4a4"):
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    return fxquant.compile(model, recipe, calib=calib)


def images(n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Smooth random HR images (upsampled noise), uint8 H×W×3 of varied sizes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (6 + i, 5 + i, 3)).astype(np.float32)
        big = np.kron(small, np.ones((6, 6, 1), np.float32))
        out.append(big.clip(0, 255).astype(np.uint8))
    return out


def sampler(patch: int = 8, augment: bool = True) -> PatchSampler:
    return PatchSampler(images(), 2, patch, augment=augment)


def config(**changes) -> QATConfig:
    values = dict(steps=8, batch_size=4, patch=8, lr=2e-3, log_every=2, seed=3)
    values.update(changes)
    return QATConfig(**values)


class ReconOnly:
    """A ``backward`` hook: the gradient of the reconstruction term alone (whatever the
    regularizers add), averaged over the ranks first when ``average``."""

    name = "recon-only"

    def __init__(self, average: bool = False):
        self.average, self.calls = average, 0

    def __call__(self, ctx, parts, params):
        self.calls += 1
        grads = torch.autograd.grad(parts["recon"], params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if self.average:
            grads = ctx.average(grads)
        for p, g in zip(params, grads):
            p.grad = g
        return {"hooked": float(self.calls)}
