"""Helpers shared by the model zoo tests (tests/models/)."""

from __future__ import annotations

import torch

from fxquant.models import CARNM


def run(model, x: torch.Tensor, scale: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(x, scale) if isinstance(model, CARNM) else model(x)
