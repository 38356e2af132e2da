"""The ``gpu`` target's 1×1 convolutions as one ``torch._int_mm`` (cuBLASLt int8 GEMM on a GPU).

A 1×1, stride-1, unpadded, ungrouped conv on NHWC codes is a GEMM: ``(N·H·W) × C`` codes
times ``C × O`` weights. ``torch._int_mm`` takes int8 × int8 only, so the uint8 codes are
shifted as in the Triton kernel (fxquant/lower/triton_conv.py): ``a = q − 128`` (one XOR of
the sign bit), and ``Σ (q − z)·k = Σ a·k − (z − 128)·K_o`` with ``K_o`` the sum of output
channel ``o``'s weight codes. With no padding there is no border term. The epilogue is the
kernel's, op by op in torch (float32 ``acc·s``, ``+ bias``, ``+ residual``, ReLU, then the
reference quantizer's rounding), so the result equals the reference bit for bit.

cuBLASLt's int8 GEMM wants M > 16 and K and N multiples of 8 (LOWERING.md §10 in the shared
reference): :func:`layer_fits` says when a layer qualifies, and the caller checks M. The
weights go in as the transpose of a contiguous O × C matrix (column-major: the "TN" layout
int8 GEMMs are built around; other layouts have had wrong results on some GPUs). On the CPU
``torch._int_mm`` is exact with no shape constraints, which is how the tests check this path
under ``TRITON_INTERPRET=1``.

Off by default (:data:`USE_INT_MM`): on an H200 (tools/gpu_check.py, docs/performance.md)
the path was bit-exact with the reference, but IMDN ×4 ran slower with it than with its 1×1
convs in the Triton kernel (CUDA graphs: 1.97 against 1.79 ms; eager 7.87 against 6.91):
the GEMM is fast, but its epilogue here is half a dozen separate torch ops where the
kernel's is fused.
"""

from __future__ import annotations

import torch

from fxquant.lower.uniform_codes import quantize_codes

MIN_ROWS, MULTIPLE = 17, 8  # cuBLASLt: M > 16, K % 8 == 0, N % 8 == 0
USE_INT_MM = False  # read at each call: tools/gpu_check.py times the layers both ways


def layer_fits(in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
               groups: int) -> bool:
    """True for a conv that is a plain GEMM with cuBLASLt-shaped K and N."""
    return (tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0) and tuple(dilation) == (1, 1) and groups == 1
            and in_channels % MULTIPLE == 0 and out_channels % MULTIPLE == 0)


def int_mm_conv1x1(codes: torch.Tensor, weight: torch.Tensor, weight_sum: torch.Tensor,
                   scale: torch.Tensor, bias: torch.Tensor | None, x_zero_point: int, *,
                   residual: torch.Tensor | None = None, relu: bool = False,
                   out_quant: tuple[float, int, int] | None = None) -> torch.Tensor:
    """``codes``: uint8 N×C×H×W (channels_last: no copy); ``weight``: int8 O×C contiguous;
    ``weight_sum``: int32 per output channel; ``scale``: float32 ``s_x·s_w``. Float32 (or
    uint8 codes with ``out_quant = (scale, zero_point, qmax)``, rounded by
    :func:`~fxquant.lower.uniform_codes.quantize_codes`) N×O×H×W, channels_last, as
    :func:`~fxquant.lower.triton_conv.int8_conv` returns."""
    n, c, h, w = codes.shape
    rows = codes.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when channels_last
    shifted = torch.bitwise_xor(rows, 128).view(torch.int8)  # q − 128 in two's complement
    acc = torch._int_mm(shifted, weight.t())
    acc = acc - (x_zero_point - 128) * weight_sum
    y = acc.float() * scale
    if bias is not None:
        y = y + bias
    y = y.view(n, h, w, -1).permute(0, 3, 1, 2)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    if out_quant is not None:
        out_scale, out_zp, out_qmax = out_quant
        y = quantize_codes(y, out_scale, out_zp, out_qmax)
    return y.contiguous(memory_format=torch.channels_last)
