"""Every error fxquant raises on purpose derives from :class:`FxquantError`.

Each one says what was wrong and what would be valid, so that a user never has to read
a stack trace from inside torch to find out that a recipe key was misspelt.
"""

from __future__ import annotations


class FxquantError(Exception):
    """Base class of fxquant's user-facing errors."""


class RecipeError(FxquantError, ValueError):
    """A recipe is malformed: unknown key, wrong type, impossible value."""


class TraceFailure(FxquantError):
    """A model could not be symbolically traced."""


class CalibrationError(FxquantError, ValueError):
    """Calibration data is missing, empty, or not finite."""


class CheckpointError(FxquantError):
    """A checkpoint cannot be read or does not match the model."""


class DataError(FxquantError):
    """A data root, image, or dataset is missing or unreadable."""


class OutputError(FxquantError):
    """An output file or folder cannot be written: its folder is missing or read-only, the
    path names a folder, or the write failed (disk full, file-size limit)."""


class StoreError(FxquantError):
    """A results store (JSON) cannot be read or is not a store of fxquant results."""


class PassError(FxquantError):
    """A pass failed, or left a graph that does not verify.

    ``pass_name`` is the failing pass, ``node`` the offending node name when one is known,
    and ``previous`` the passes that ran before it.
    """

    def __init__(self, pass_name: str, message: str, node: str | None = None,
                 previous: tuple[str, ...] = ()):
        self.pass_name = pass_name
        self.node = node
        self.previous = previous
        where = f" at node '{node}'" if node else ""
        after = f" (after: {', '.join(previous)})" if previous else ""
        super().__init__(f"pass '{pass_name}' failed{where}{after}: {message}")
