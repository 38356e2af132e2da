"""The error every deployment exporter raises."""

from __future__ import annotations

from fxquant.errors import FxquantError


class ExportError(FxquantError, ValueError):
    """A compiled model, quantizer or op that the requested deployment format cannot express;
    the message names it and what would export."""
