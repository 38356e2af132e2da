"""The interface every fake-quantizer module implements, so tools can describe any of them."""

from __future__ import annotations

from torch import nn


class Quantizer(nn.Module):
    """A fake-quantizer: ``forward`` returns the de-quantized value of its input.

    ``describe()`` feeds graph dumps and ``fxquant inspect``: it returns at least ``kind``,
    ``bits``, ``granularity`` and ``mode`` (``static`` or ``dynamic``). ``check()`` raises
    ``ValueError`` when the quantizer's parameters are unusable (non-finite or non-positive
    scales); the pass manager calls it after every pass.
    """

    kind = "quantizer"

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self) -> None:
        """Subclasses override; the base quantizer has nothing to check."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "kind")
