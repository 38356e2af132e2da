"""Images, MATLAB-compatible bicubic resizing, benchmark sets, calibration patches, tensors."""

from fxquant.data.benchmark import BENCHMARK_SETS, BenchmarkSet, SRPair
from fxquant.data.convert import rgb_to_ycbcr, to_tensor, to_uint8, to_y_tensor, ycbcr_to_rgb
from fxquant.data.images import load_image, save_image
from fxquant.data.imresize import bicubic_downscale, bicubic_upscale, imresize, mod_crop
from fxquant.data.patches import CalibrationPatches, calibration_patches

__all__ = [
    "BENCHMARK_SETS", "BenchmarkSet", "SRPair",
    "to_tensor", "to_uint8", "rgb_to_ycbcr", "ycbcr_to_rgb", "to_y_tensor",
    "load_image", "save_image",
    "imresize", "mod_crop", "bicubic_downscale", "bicubic_upscale",
    "calibration_patches",
    "CalibrationPatches",
]
