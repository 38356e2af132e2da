"""fxquant: a torch.fx graph-transformation compiler that quantizes super-resolution networks.

    import fxquant
    qmodel = fxquant.compile(model, "minmax-w8a8", calib=patches)
"""

from fxquant.compiler import compile, load, lowered_copy, save, transformed_copy
from fxquant.deploy import ExportError, export
from fxquant.errors import (
    CalibrationError,
    CheckpointError,
    DataError,
    FxquantError,
    PassError,
    RecipeError,
    TraceFailure,
)
from fxquant.pipeline import Pass, PassContext, PassManager, PassResult, parse_pipeline, register_pass
from fxquant.recipe import Recipe, available_presets, load_preset, resolve_recipe
from fxquant.tracing import trace

import fxquant.passes  # noqa: E402,F401  - registers the built-in passes and methods

__version__ = "0.1.0"

__all__ = [
    "CalibrationError", "CheckpointError", "DataError", "ExportError", "FxquantError", "Pass",
    "PassContext",
    "PassError", "PassManager", "PassResult", "Recipe", "RecipeError", "TraceFailure",
    "available_presets", "compile", "export", "load", "load_preset", "lowered_copy", "parse_pipeline", "register_pass",
    "resolve_recipe", "save", "trace", "transformed_copy",
]
