"""Integer execution targets for compiled graphs: ``reference`` (the exact integer semantics,
the oracle) and ``cpu`` (oneDNN int8). The ``lower`` pass swaps them in."""

from fxquant.lower.conv import (
    TARGETS,
    CpuConv2d,
    IntegerConv2d,
    LoweringError,
    ReferenceConv2d,
    accumulator_bound,
)
from fxquant.lower.guard import InputGuard
from fxquant.lower.triton_conv import GpuConv2d  # registers TARGETS["gpu"]
from fxquant.lower.uniform_codes import IntegerQuantize

__all__ = ["TARGETS", "CpuConv2d", "GpuConv2d", "InputGuard", "IntegerConv2d", "IntegerQuantize", "LoweringError",
           "ReferenceConv2d", "accumulator_bound"]
