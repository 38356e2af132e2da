"""Quantizer math and the modules that passes insert into graphs."""

from fxquant.quant.base import (
    QUANT_MODES,
    AffineCodes,
    CodebookCodes,
    Quantizer,
    quant_mode,
    set_quant_mode,
)
from fxquant.quant.layers import QuantConv2d, swap_in_quant_conv
from fxquant.quant.uniform import (
    UniformQuantizer,
    affine_qparams,
    fake_quantize,
    round_ste,
    symmetric_qparams,
)

__all__ = [
    "QUANT_MODES",
    "AffineCodes",
    "CodebookCodes",
    "Quantizer",
    "quant_mode",
    "set_quant_mode",
    "QuantConv2d",
    "UniformQuantizer",
    "affine_qparams",
    "fake_quantize",
    "round_ste",
    "swap_in_quant_conv",
    "symmetric_qparams",
]
