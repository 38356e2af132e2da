"""Exact oneDNN int8 convolutions on CPUs whose int8 dot product saturates.

Without VNNI (AMD Zen 2/3, AVX2 only; Intel before Cascade Lake, AVX-512 included), oneDNN's
u8 × s8 kernels multiply with ``vpmaddubsw``, which adds two adjacent u8·s8 products into a
*saturating* int16 before widening to int32: ``255·127 + 255·127 = 64 770`` becomes 32 767
and the int32 accumulator is silently wrong. VNNI (``vpdpbusd``, AVX-512 VNNI, AVX-VNNI,
AMX) accumulates into int32 directly. oneDNN documents this ("Nuances of int8
computations"); torch.ao and ONNX Runtime answer it with 7-bit ("reduce_range") weights or
activations, which changes the quantized model.

fxquant keeps the model and the result exact instead: where ``2·q_max·max|k| > 32 767`` for
a conv's uint8 codes ``q`` and int8 weight codes ``k``, the weights are split into two planes
``k = k_a + k_b`` with ``|k_a|, |k_b| <= 64``; every pair then sums to at most
``2·255·64 = 32 640`` and the two int8 convs' outputs add to the exact accumulator (the sum
of their float32 outputs rounds once more). 4-bit activations (``q <= 15``) never need it.
The split costs a second int8 conv per 8-bit layer, so CPUs without VNNI run the 8-bit
``cpu`` target at about half its int8 speed (docs/lowering.md).

``FXQUANT_INT8_PAIRS=saturating`` (or ``exact``) overrides the detection: the tests force the
split path on every CPU, and on a CPU without VNNI ``exact`` (read when a model is lowered or
loaded) trades bit-exactness for speed, one plane in oneDNN's own arithmetic (measured:
IMDN ×4 W8A8 0.013 dB lower, 1.41× against 0.96× FP32 eager; docs/lowering.md).
"""

from __future__ import annotations

import functools
import os

import torch

INT16_MAX = 2 ** 15 - 1
PLANE_LIMIT = 64  # |k| <= 64: 2·255·64 = 32 640 <= INT16_MAX
# CPU features with an int32-accumulating u8 × s8 dot product (no int16 intermediate)
EXACT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
OVERRIDE = "FXQUANT_INT8_PAIRS"


def int8_pairs_saturate() -> bool:
    """Whether oneDNN's u8 × s8 convolutions on this CPU sum product pairs in int16."""
    override = os.environ.get(OVERRIDE, "").strip().lower()
    if override in ("saturating", "exact"):
        return override == "saturating"
    if override:
        raise ValueError(f"{OVERRIDE}={override!r}: use 'saturating', 'exact' or leave it unset")
    return _cpu_pairs_saturate()


@functools.cache
def _cpu_pairs_saturate() -> bool:
    """The detection itself, once per process (the folded convs ask on every call)."""
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") != "x86_64":
        return False  # the saturating vpmaddubsw path is x86's
    return not any(caps.get(feature, False) for feature in EXACT_FEATURES)


def needs_split(code_max: int, weight_codes: torch.Tensor) -> bool:
    """Whether an int8 conv of codes up to ``code_max`` can saturate a pair on this CPU."""
    if not weight_codes.numel() or not int8_pairs_saturate():
        return False
    # widened first: abs(int8 −128) overflows to −128
    return 2 * code_max * int(weight_codes.to(torch.int16).abs().max()) > INT16_MAX


def split_weight_codes(weight_codes: torch.Tensor) -> list[torch.Tensor]:
    """``k = k_a + k_b`` with both int8 and ``|k| <= 64`` (exact: ``k_b = k − k_a`` lies in
    −64..63 for int8 ``k``)."""
    first = weight_codes.clamp(-PLANE_LIMIT, PLANE_LIMIT)
    return [first, (weight_codes.to(torch.int16) - first).to(torch.int8)]
