"""fxquant's FX passes, one per module. Importing this package registers them by name."""

from fxquant.passes.calibrate import CalibratePass
from fxquant.passes.deconv_to_conv import DeconvToConvPass
from fxquant.passes.dfsq_observe import DFSQObservePass
from fxquant.passes.fold_channel_norm import FoldChannelNormPass
from fxquant.passes.fold_input_scales import FoldInputScalesPass
from fxquant.passes.fswa import FSWAPass
from fxquant.passes.inject_offsets import InjectOffsetsPass
from fxquant.passes.fold_offsets import FoldOffsetsPass
from fxquant.passes.daq import DAQPass, DAQSensitivityPass
from fxquant.passes.equalize import EqualizePass
from fxquant.passes.lower import LowerPass
from fxquant.passes.nonuniform_quant import I2NQOptions, NonUniformQuantizePass
from fxquant.passes.observe import ObservePass
from fxquant.passes.quantize import QuantizePass
from fxquant.passes.reconstruct import ReconstructPass
from fxquant.passes.subset_quant import DFSQOptions, SubsetQuantizePass
from fxquant.passes.trace import TracePass
from fxquant.passes.verify import VerifyPass
from fxquant.passes.wcc import WCCPass

__all__ = ["CalibratePass", "DeconvToConvPass", "DFSQObservePass", "DFSQOptions", "FoldChannelNormPass", "FoldInputScalesPass", "SubsetQuantizePass",
           "DAQPass", "DAQSensitivityPass", "EqualizePass", "FSWAPass", "FoldOffsetsPass", "I2NQOptions", "InjectOffsetsPass", "NonUniformQuantizePass", "LowerPass", "ObservePass", "QuantizePass", "ReconstructPass", "TracePass", "VerifyPass", "WCCPass"]
