"""fxquant's FX passes, one per module. Importing this package registers them by name."""

from fxquant.passes.calibrate import CalibratePass
from fxquant.passes.observe import ObservePass
from fxquant.passes.quantize import QuantizePass
from fxquant.passes.trace import TracePass
from fxquant.passes.verify import VerifyPass

__all__ = ["CalibratePass", "ObservePass", "QuantizePass", "TracePass", "VerifyPass"]
