"""The ``gpu`` target: an int8 implicit-GEMM convolution in Triton on uint8 NHWC codes.

Same integer semantics as :class:`~fxquant.lower.conv.ReferenceConv2d`::

    acc_o = Σ (q − z)·k_o      y_o = acc_o·(s_x·s_w[o]) + bias_o  [+ residual] [ReLU]
    [codes = clamp(round(y / s_out) + z_out, 0, qmax)]              (fused requantization)

``tl.dot`` multiplies int8 by int8 (uint8 has no tensor-core form), so the codes are shifted:
``a = q − 128`` inside the image and ``a = z − 128`` in the zero padding (a padded input is the
real value 0, whose code is ``z``). Then ``Σ a·k = Σ_in (q − z)·k + (z − 128)·Σ_all k`` and
``acc = dot(a, k) − (z − 128)·K_o`` with ``K_o`` the sum of channel ``o``'s weight codes: one
constant per output channel, exact at the border. Channels beyond ``C`` (odd counts padded to
the K block) load weight 0 and add nothing.

A 1×1 conv whose shapes suit cuBLASLt's int8 GEMM runs as one ``torch._int_mm`` instead
(fxquant/lower/int_mm.py), with the same integer semantics and epilogue.

:class:`GpuDaqConv2d` runs DAQ's and DFSQ's per-(image, channel) input scales through the
same kernel, folded into per-image weights (fxquant/lower/daq.py).

Kernels run on a CUDA GPU, and on the CPU under ``TRITON_INTERPRET=1`` (how CI checks them
bit-exact against ``reference``). The kernel is built on first use so that the interpreter
switch is read then, not at import.
"""

from __future__ import annotations

import os

import torch

from fxquant.lower import int_mm
from fxquant.lower.conv import TARGETS, FusedOutputConv2d, LoweringError
from fxquant.lower.folded import LAYERS as FOLDED_LAYERS
from fxquant.lower.border import add_border
from fxquant.lower.folded import CpuDaqConv2d
from fxquant.lower.planes import code_planes
from fxquant.lower.padding import pad_codes

# BLOCK_K a multiple of 32 (the int8 mma's k). On an H200 (tools/gpu_check.py, CUDA graphs,
# EDSR-baseline ×4 at 720p) 128×64×64 ran in 4.60 ms against 5.80 for 32×32×32; 64×64×64
# and 128×64×64 stay within 8 % of each other across runs (docs/performance.md)
BLOCK_M, BLOCK_N, BLOCK_K = 128, 64, 64

_KERNEL = None


def triton_available() -> str | None:
    """None when the gpu target can run here, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install '.[gpu]')"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_conv_kernel(x_ptr, w_ptr, wsum_ptr, scale_ptr, bias_ptr, res_ptr, out_ptr,
                         MI, TILES, w_img_stride, v_img_stride,
                         H, W, C, OH, OW, COUT, CIN_G, COUT_G,
                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                         x_zp, out_scale, out_zp, out_qmax,
                         KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_RES: tl.constexpr, RELU: tl.constexpr, QUANT_OUT: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m, pid_n, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # rows (output pixels) in blocks of MI (all of them, or one image's with per-image
        # weights), TILES row tiles per block; block ``img`` reads its own weights
        img = pid_m // TILES
        local = (pid_m % TILES) * BM + tl.arange(0, BM)
        offs_m = img * MI + local
        offs_n = pid_n * BN + tl.arange(0, BN)
        m_ok = local < MI
        w_ptr += img * w_img_stride
        wsum_ptr += img * v_img_stride
        scale_ptr += img * v_img_stride
        bias_ptr += img * v_img_stride
        n_ok = offs_n < COUT_G
        ow = offs_m % OW
        oh = (offs_m // OW) % OH
        nb = offs_m // (OW * OH)
        co = g * COUT_G + offs_n
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh * stride_h - pad_h + kh * dil_h
                iw = ow * stride_w - pad_w + kw * dil_w
                inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row = ((nb * H + ih) * W + iw) * C + g * CIN_G
                for c0 in range(0, CIN_G, BK):
                    offs_k = c0 + tl.arange(0, BK)
                    k_ok = offs_k < CIN_G
                    q = tl.load(x_ptr + row[:, None] + offs_k[None, :],
                                mask=inside[:, None] & k_ok[None, :], other=0)
                    a = tl.where(inside[:, None], q.to(tl.int32) - 128, x_zp - 128)
                    a = tl.where(k_ok[None, :], a, 0).to(tl.int8)
                    wk = tl.load(w_ptr + ((kh * KW + kw) * CIN_G + offs_k)[:, None] * COUT
                                 + co[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
                    acc += tl.dot(a, wk, out_dtype=tl.int32)
        wsum = tl.load(wsum_ptr + co, mask=n_ok, other=0)
        acc = acc - (x_zp - 128) * wsum[None, :]
        scale = tl.load(scale_ptr + co, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * scale[None, :]
        out_offs = offs_m[:, None] * COUT + co[None, :]
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + co, mask=n_ok, other=0.0)[None, :]
        if HAS_RES:
            y = y + tl.load(res_ptr + out_offs, mask=mask, other=0.0)
        if RELU:
            y = tl.maximum(y, 0.0)
        if QUANT_OUT:
            v = tl.div_rn(y, out_scale)  # IEEE division, as torch's x / s
            # round half to even, as torch.round; floor(v + 0.5) would round 0.49999997 up
            r = tl.floor(v)
            frac = v - r  # exact
            odd = r - 2.0 * tl.floor(r * 0.5) != 0.0
            r = tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)
            r = tl.minimum(tl.maximum(r + out_zp, 0.0), out_qmax)
            tl.store(out_ptr + out_offs, r.to(tl.uint8), mask=mask)
        else:
            tl.store(out_ptr + out_offs, y, mask=mask)

    return int8_conv_kernel


def int8_conv(codes: torch.Tensor, weight_t: torch.Tensor, weight_sum: torch.Tensor,
              scale: torch.Tensor, bias: torch.Tensor | None, x_zero_point: int, *,
              kernel_size, stride, padding, dilation, groups: int,
              residual: torch.Tensor | None = None, relu: bool = False,
              out_quant: tuple[float, int, int] | None = None,
              per_image: bool = False) -> torch.Tensor:
    """The Triton conv on uint8 codes (N×C×H×W in channels_last memory): float32 NCHW
    (channels_last) output, or uint8 codes when ``out_quant = (scale, zero_point, qmax)``.
    ``weight_t`` is the int8 weight as KH×KW×C/g×O, ``weight_sum`` its int32 per-channel sum,
    ``scale`` the float32 ``s_x·s_w``; ``residual`` (N×O×H'×W') is added before ReLU.
    ``per_image``: each image has its own weights (DAQ's and DFSQ's folded ones), all
    launched at once: ``weight_t`` N×KH×KW×C/g×O, ``weight_sum``, ``scale`` and ``bias`` N×O."""
    global _KERNEL
    reason = triton_available()
    if reason is not None:
        raise LoweringError(f"lower target 'gpu' cannot run: {reason}")
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    n, c, h, w = codes.shape
    kh, kw = kernel_size
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cout = weight_t.shape[-1]
    x = codes.permute(0, 2, 3, 1).contiguous()  # NHWC storage (a view when channels_last)
    dtype = torch.uint8 if out_quant is not None else torch.float32
    out = torch.empty((n, oh, ow, cout), dtype=dtype, device=codes.device)
    res = None
    if residual is not None:
        res = residual.float().permute(0, 2, 3, 1).contiguous()
    # rows per weight block: one image's with per-image weights, else all of them
    rows = oh * ow if per_image else n * oh * ow
    tiles = triton_cdiv(rows, BLOCK_M)
    w_stride = weight_t[0].numel() if per_image else 0
    v_stride = cout if per_image else 0
    o_scale, o_zp, o_qmax = out_quant if out_quant is not None else (1.0, 0, 255)
    grid = ((n if per_image else 1) * tiles, triton_cdiv(cout // groups, BLOCK_N), groups)
    _KERNEL[grid](x, weight_t, weight_sum, scale, bias if bias is not None else scale,
                  res if res is not None else scale, out,
                  rows, tiles, w_stride, v_stride,
                  h, w, c, oh, ow, cout, c // groups, cout // groups,
                  stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                  int(x_zero_point), float(o_scale), float(o_zp), float(o_qmax),
                  KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_RES=res is not None,
                  RELU=relu, QUANT_OUT=out_quant is not None,
                  BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K,
                  # no fused multiply-add: acc·scale and + bias round separately, as the
                  # reference's two float32 ops do (the interpreter ignores the option)
                  enable_fp_fusion=False)
    return out.permute(0, 3, 1, 2)  # N×O×H'×W' view of NHWC storage (channels_last)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GpuConv2d(FusedOutputConv2d):
    """Integer conv through the Triton kernel (see the module docstring); centred
    (asymmetric) weights add the same ``c_o·s_w[o]·s_x·S`` correction as the other targets.
    Fused requantization rounds exactly as the reference quantizer (IEEE division, half to
    even), so fusing changes no code."""

    target = "gpu"
    channels_last = True

    def prepare(self) -> None:
        reason = triton_available()
        if reason is not None:
            raise LoweringError(f"lower target 'gpu' cannot run here: {reason}")
        k = self.weight_codes
        self._weight_t = k.permute(2, 3, 1, 0).contiguous()  # KH×KW×C/g×O
        self._weight_sum = k.to(torch.int32).sum(dim=(1, 2, 3)).contiguous()
        self._scale = (self.input_scale * self.weight_scale).float().contiguous()
        self._bias = None if self.bias is None else self.bias.float().contiguous()
        self._corrected = bool((self.weight_centre != 0).any())
        # Python copies of the scalar buffers: reading a CUDA buffer in forward would stall
        # the GPU once per layer (and cannot be captured in a CUDA graph)
        self._x_zp, self._relu = int(self.input_zero_point), bool(self.output_relu)
        self._out_quant = None
        if float(self.output_scale) > 0:
            self._out_quant = (float(self.output_scale), int(self.output_zero_point),
                               int(self.output_qmax))
        self._gemm = int_mm.layer_fits(self.in_channels, self.out_channels, self.kernel_size,
                                       self.stride, self.padding, self.dilation, self.groups)
        self._weight_mat = k.reshape(k.shape[0], -1).contiguous() if self._gemm else None

    def _apply(self, fn, recurse=True):  # .cuda() / .to(): derived tensors follow the buffers
        super()._apply(fn, recurse)
        self.prepare()
        return self

    def forward(self, codes: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``codes``: uint8 N×C×H×W; ``residual``: a float tensor added to the output in the
        epilogue (the ``lower`` pass fuses ``conv + r`` into it)."""
        if codes.dtype != torch.uint8:
            raise LoweringError(f"the gpu conv takes uint8 codes, got {codes.dtype}")
        codes = pad_codes(codes, self.pre_pad, self.pad_mode)
        relu = self._relu
        if (residual is not None or relu) and self._corrected:
            raise LoweringError("a centred (asymmetric-weight) conv adds its correction after "
                                "the kernel: residual/ReLU cannot be fused into it")
        n, _, h, w = codes.shape
        if self._gemm and int_mm.USE_INT_MM and n * h * w >= int_mm.MIN_ROWS:
            y = int_mm.int_mm_conv1x1(codes, self._weight_mat, self._weight_sum, self._scale,
                                      self._bias, self._x_zp, residual=residual, relu=relu,
                                      out_quant=self._out_quant)
        else:
            y = int8_conv(codes, self._weight_t, self._weight_sum, self._scale, self._bias,
                          self._x_zp, kernel_size=self.kernel_size,
                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                          groups=self.groups, residual=residual, relu=relu,
                          out_quant=self._out_quant)
        if not self._corrected:
            return y
        return self.add_centring(y, self.window_sum(codes, torch.float32))


class GpuDaqConv2d(CpuDaqConv2d):
    """DAQ's and DFSQ's per-(image, channel) input scales on the gpu target: the same
    per-image folded weights as :class:`~fxquant.lower.daq.CpuDaqConv2d` (requantized to
    int8 per (image, output channel); ``weight_planes`` planes), convolved by the Triton
    kernel with per-image weights (input zero point 0: a padded code is 0, and the offset
    term, border-exact, carries β). The scales vary along the reduction (input channels), so
    they cannot scale the int32 accumulator inside the kernel; folded into the weights they
    leave it the static one.

    One launch per (weight plane, code plane) for the whole batch, each adding the previous
    launch's output in its epilogue (the cpu target's order of additions; a code plane ``k``
    scales by ``256^k``, exactly), the folding on the GPU, and no host read but the NaN-step
    refusal (skipped while a CUDA graph is captured) and, once per input size, the border
    rows: the layer can be replayed as a CUDA graph."""

    target = "gpu"

    @staticmethod
    def code_limit() -> int:
        return 255  # the s8×s8 dot on shifted codes cannot saturate: all of uint8

    @classmethod
    def from_quantized(cls, conv, source: str = ""):
        reason = triton_available()
        if reason is not None:
            raise LoweringError(f"lower target 'gpu' cannot run here: {reason}")
        return super().from_quantized(conv, source)

    def forward(self, packed) -> torch.Tensor:
        codes, step, offset, centre = packed
        if not (step.is_cuda and torch.cuda.is_current_stream_capturing()):  # no host read
            self.refuse_non_finite(step)                                    # while captured
        planes = pad_codes(code_planes(codes), self.pre_pad, self.pad_mode)
        n, _, h, w = planes[0].shape
        wplanes, (v, rows, cols), bias = self.folded_planes(step, offset, (h, w), centre)
        y = None
        for j, (wcodes, wscale) in enumerate(wplanes):
            weight_t = wcodes.permute(0, 3, 4, 2, 1).contiguous()  # N×KH×KW×C/g×O
            weight_sum = wcodes.to(torch.int32).sum(dim=(2, 3, 4))
            for k, plane in enumerate(planes):
                scale = wscale if k == 0 else wscale * float(256 ** k)  # exact
                y = int8_conv(plane, weight_t, weight_sum, scale.float().contiguous(),
                              bias.contiguous() if j == 0 and k == 0 else None, 0,
                              kernel_size=self.kernel_size, stride=self.stride,
                              padding=self.padding, dilation=self.dilation,
                              groups=self.groups, residual=y, per_image=True)
        # the strips are kept per input size (a host read the first time only)
        return add_border(y, v, rows, cols, self.strips((h, w), rows.dtype, rows.device))


TARGETS["gpu"] = GpuConv2d
FOLDED_LAYERS["gpu"] = GpuDaqConv2d
