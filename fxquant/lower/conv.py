"""Integer convolutions: the ``reference`` oracle and the ``cpu`` (oneDNN int8) kernel.

Both compute, for a static uniform input quantizer ``(s_x, z_x)`` and per-output-channel
integer weights ``W = s_w[o]·k`` (``k`` the weight quantizer's integer codes)::

    q     = clamp(round(x / s_x) + z_x, qmin, qmax)           uint8 codes (a <= 8 bits)
    acc_o = Σ (q − z_x)·k_o                                   exact int32 accumulation
    y_o   = acc_o · (s_x·s_w[o]) + bias_o                     float32 output

oneDNN takes symmetric int8 weights only. An asymmetric weight grid (min/max weights: the
codes of a channel are ``2^b`` consecutive integers anywhere, e.g. 8..263) is centred:
``k = (k − c_o) + c_o`` with ``k − c_o`` in int8 and ``acc_o = Σ(q − z)(k − c_o) + c_o·S``
where ``S = Σ(q − z)`` over the receptive field (a channel sum and a box filter, exact in
float32). Exact, and free when every ``c_o`` is 0 (symmetric weights).

A folded per-channel input quantizer (``fold-input-scales``: its steps moved into the
weights) gives unit ``s_x`` and one zero point per input channel ``z_c``; ``reference``
subtracts them before its convolution, ``cpu`` runs oneDNN on the raw codes and subtracts the
zero points' taps ``s_w[o]·Σ_c k_o·z_c``: their sum in the bias, the padding's share on the
border strips afterwards (docs/lowering.md).

Overflow bound (asserted by the ``lower`` pass): with ``K = C_in/g·k_h·k_w``, both int32
accumulators are bounded by ``K·(2^a − 1)·128``, below 2^31 − 1 for ``K <= 65 793`` at
``a = 8`` (a 3×3 conv with up to 7 310 input channels). docs/lowering.md derives it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import FxquantError
from fxquant.lower.border import BorderTaps, add_border
from fxquant.lower.int8_pairs import needs_split, split_weight_codes
from fxquant.lower.padding import lowered_padding, pad_codes
from fxquant.lower.uniform_codes import IntegerQuantize, quantize_codes

INT8_MIN, INT8_MAX = -128, 127
INT32_MAX = 2 ** 31 - 1


class LoweringError(FxquantError, ValueError):
    """A graph, layer or input that the integer targets cannot take."""


def accumulator_bound(fan_in: int, act_bits: int) -> int:
    """Largest |int32 accumulator| of a lowered conv (see the module docstring)."""
    return fan_in * (2 ** act_bits - 1) * (-INT8_MIN)


def centre_codes(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-output-channel integer codes ``k`` (O × ...) into int8 ``k − c`` and ``c``.

    ``c_o = 0`` where the channel's codes already fit int8 (always for symmetric weights)."""
    flat = k.reshape(k.shape[0], -1).long()
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
    if bool((hi - lo > INT8_MAX - INT8_MIN).any()):
        raise LoweringError("weight codes span more than 256 levels: weights above 8 bits "
                            "have no int8 form")
    fits = (lo >= INT8_MIN) & (hi <= INT8_MAX)
    centre = torch.where(fits, torch.zeros_like(lo), lo - INT8_MIN)
    return (k.long() - centre.view((-1,) + (1,) * (k.ndim - 1))).to(torch.int8), centre


def window_sum(codes: torch.Tensor, zero_point: torch.Tensor, groups: int, kernel_size,
               stride, padding, dilation, dtype: torch.dtype) -> torch.Tensor:
    """``S = Σ (q − z)`` over each output's receptive field, per group: N × groups × H' × W'.

    The sum over a group's channels comes first, then a k_h×k_w box filter on that single
    plane: O(H·W·(C + k²)) against the conv's O(H·W·C·O·k²). Exact in float32 while
    ``C/g·k_h·k_w·(2^a − 1) < 2^24`` (the lower pass's accumulator bound is stricter)."""
    q = codes.to(dtype) - zero_point.to(dtype)
    plane = q.unflatten(1, (groups, -1)).sum(2)
    ones = torch.ones((groups, 1) + tuple(kernel_size), dtype=dtype, device=codes.device)
    return F.conv2d(plane, ones, None, stride, padding, dilation, groups)


def permute_output_buffers(module: nn.Module, names, order: torch.Tensor) -> None:
    """Reorder ``module``'s per-output-channel buffers ``names`` (dim 0; None ones skipped)
    so that channel ``k`` holds what channel ``order[k]`` held, and record ``order`` as its
    ``output_order`` (the phase-major shuffle rewrite, passes/lower_rewrites.py)."""
    with torch.no_grad():
        for name in names:
            buffer = getattr(module, name)
            if buffer is not None:
                buffer.copy_(buffer[order].clone())
    module.output_order = order


class IntegerConv2d(nn.Module):
    """State shared by the integer targets: int8 weight codes, scales, the input quantizer's
    integer parameters. Built by :meth:`from_quantized`; ``state_dict`` round-trips."""

    target = ""
    channels_last = False  # the layout of the codes it prefers
    # output channel k computes the float conv's channel output_order[k] (set by the lower
    # pass's phase-major shuffle rewrite, rebuilt with the graph; None: the float order)
    output_order: torch.Tensor | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding,
                 dilation, groups: int, has_bias: bool, act_bits: int,
                 per_channel_input: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.act_bits = act_bits
        self.qmin, self.qmax = 0, 2 ** act_bits - 1
        self.source = ""
        # a padding mode other than zeros pads the input codes first (fxquant/lower/padding.py)
        self.pre_pad, self.pad_mode = None, "zeros"
        self.symmetric_weights = False  # set from the weight quantizer: no centring possible
        self.register_buffer("weight_codes", torch.zeros(
            (out_channels, in_channels // groups) + self.kernel_size, dtype=torch.int8))
        self.register_buffer("weight_centre", torch.zeros(out_channels, dtype=torch.int64))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)
        # a folded per-channel input quantizer: unit scale (the steps are in the weights) and
        # one zero point per input channel
        self.per_channel_input = per_channel_input
        zp_shape = (1, in_channels, 1, 1) if per_channel_input else ()
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros(zp_shape, dtype=torch.int64))

    @classmethod
    def from_quantized(cls, input_quantizer, conv, source: str = "") -> "IntegerConv2d":
        """From a static uniform input quantizer (per tensor, or per channel and folded) and a
        QuantConv2d (uniform weights); ``source`` names the conv in the fake-quant graph."""
        padding, pre_pad, mode = lowered_padding(conv)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    padding, conv.dilation, conv.groups, conv.bias is not None,
                    input_quantizer.bits, bool(getattr(input_quantizer, "folded", False)))
        layer.source, layer.pre_pad, layer.pad_mode = source, pre_pad, mode
        layer.symmetric_weights = bool(getattr(conv.weight_quantizer, "symmetric", False))
        codes = conv.weight_quantizer.integer_codes(conv.weight)
        k = codes.codes.long() - codes.zero_point.long()
        scale = codes.scale.reshape(-1).expand(conv.out_channels)
        with torch.no_grad():
            weight_codes, centre = centre_codes(k)
            layer.weight_codes.copy_(weight_codes)
            layer.weight_centre.copy_(centre)
            layer.weight_scale.copy_(scale)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
            if not layer.per_channel_input:  # folded: unit scale, the steps are in the weights
                layer.input_scale.copy_(input_quantizer.scale.detach().reshape(()))
            layer.input_zero_point.copy_(input_quantizer.zero_point.detach()
                                         .reshape(layer.input_zero_point.shape).long())
        layer.prepare()
        return layer

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def prepare(self) -> None:
        """Build derived state after the buffers change (prepacking for ``cpu``)."""

    def permute_outputs(self, order: torch.Tensor) -> None:
        """Compute output channel ``order[k]`` of the float conv as channel ``k`` (weights,
        centres, scales and bias move together; each output channel is computed on its own,
        so nothing else changes) and record it in :attr:`output_order`."""
        permute_output_buffers(self, ("weight_codes", "weight_centre", "weight_scale", "bias"),
                               order)
        self.prepare()

    def window_sum(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``S`` of the centring correction (see :func:`window_sum`)."""
        return window_sum(codes, self.input_zero_point, self.groups, self.kernel_size,
                          self.stride, self.padding, self.dilation, dtype)

    def add_centring(self, y: torch.Tensor, window_sums: torch.Tensor) -> torch.Tensor:
        """``y_o + (c_o·s_w[o])·(s_x·S)``: the centred channels' correction, one ``S`` plane
        per group (N × groups × H' × W', float32)."""
        n, _, h, w = y.shape
        correction = (self.weight_centre.float() * self.weight_scale).view(1, self.groups, -1, 1, 1)
        s = (window_sums * self.input_scale).unsqueeze(2)
        return (y.view(n, self.groups, -1, h, w) + correction * s).view(n, -1, h, w)

    def zero_point_taps(self) -> torch.Tensor:
        """``V[o, i, j] = −s_w[o]·Σ_c k[o, c, i, j]·z_c`` (O×k_h×k_w): what the per-channel
        input zero points subtract, tap by tap, from a kernel run on the raw codes (the
        codes' zero padding contributes nothing, so only the taps inside count)."""
        g, per_group = self.groups, self.in_channels // self.groups
        z = self.input_zero_point.reshape(g, 1, per_group, 1, 1).double()
        k = self.weight_codes.double().reshape(g, self.out_channels // g, per_group,
                                               *self.kernel_size)
        v = (k * z).sum(2).reshape(self.out_channels, *self.kernel_size)
        return (-v * self.weight_scale.double().view(-1, 1, 1)).float()

    def codes_of(self, x: torch.Tensor) -> torch.Tensor:
        """The uint8 codes of a float input, as :class:`IntegerQuantize` computes them."""
        return quantize_codes(x, self.input_scale, self.input_zero_point, self.qmax)

    def extra_repr(self) -> str:
        centred = int((self.weight_centre != 0).sum())
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"a{self.act_bits} u8 x int8, centred_channels={centred}"
                + (f", codes padded {self.pad_mode} {self.pre_pad}" if self.pre_pad else "")
                + (", per-channel input zero points" if self.per_channel_input else ""))

    def describe(self) -> dict:
        zp = self.input_zero_point
        return {"target": self.target, "act_bits": self.act_bits,
                "input_scale": float(self.input_scale),
                "input_zero_point": zp.flatten().tolist() if self.per_channel_input else int(zp),
                "centred_channels": int((self.weight_centre != 0).sum())}


class ReferenceConv2d(IntegerConv2d):
    """Portable integer semantics: int codes, exact int32 accumulators, float32 rescale::

        acc_o = Σ (q − z)·(k_o − c_o)        S = Σ (q − z)     (both int32)
        y_o   = acc_o·(s_x·s_w[o]) + bias_o + (c_o·s_w[o])·(s_x·S)

    The accumulations run as float64 convolutions of integer-valued tensors, exact because
    every partial sum stays far below 2^53; they are checked against the int32 range."""

    target = "reference"

    def integer_accumulators(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(acc, S)`` of uint8 input codes as int32 (``S`` is None when no channel is
        centred)."""
        q = codes.double() - self.input_zero_point.double()
        acc = F.conv2d(q, self.weight_codes.double(), None, self.stride, self.padding,
                       self.dilation, self.groups)
        window_sum = None
        if bool((self.weight_centre != 0).any()):
            window_sum = self.window_sum(codes, torch.float64)
        for value in (acc, window_sum):
            if value is not None and bool((value.abs() > INT32_MAX).any()):
                raise LoweringError("int32 accumulator overflow")
        return acc.to(torch.int32), None if window_sum is None else window_sum.to(torch.int32)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        acc, window_sum = self.integer_accumulators(pad_codes(codes, self.pre_pad, self.pad_mode))
        y = acc.float() * (self.input_scale * self.weight_scale).view(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y if window_sum is None else self.add_centring(y, window_sum.float())


class FusedOutputConv2d(IntegerConv2d):
    """An integer conv that can emit the next quantizer's uint8 codes itself (the ``cpu`` and
    ``gpu`` targets): the epilogue's buffers, always registered so that fused and unfused
    layers have the same state_dict keys (``output_scale`` 0: float32 output), re-prepared
    when loaded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("output_scale", torch.zeros(()))
        self.register_buffer("output_zero_point", torch.zeros((), dtype=torch.int64))
        self.register_buffer("output_qmax", torch.full((), 255, dtype=torch.int64))
        self.register_buffer("output_relu", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    def fuse_output(self, quantize: "IntegerQuantize", relu: bool) -> None:
        """Emit the codes of ``quantize(relu?(y))`` directly (how each target rounds: its
        class docstring)."""
        if bool((self.weight_centre != 0).any()):
            raise LoweringError("a centred (asymmetric-weight) conv needs its float output "
                                "for the correction; it cannot emit uint8 codes")
        if (self.per_channel_input and any(self.padding)) or quantize.channels is not None:
            raise LoweringError("per-channel zero points (border correction) or per-channel "
                                "output steps need the float output; it cannot emit uint8 codes")
        with torch.no_grad():
            self.output_scale.copy_(quantize.scale)
            self.output_zero_point.copy_(quantize.zero_point)
            self.output_qmax.fill_(quantize.qmax)
            self.output_relu.fill_(relu)
        self.prepare()


class CpuConv2d(BorderTaps, FusedOutputConv2d):
    """oneDNN int8 convolution on uint8 NHWC codes with prepacked int8 weights, fp32 output,
    or uint8 codes when fused: oneDNN requantizes in its epilogue, rounding ``y/s`` in its own
    float order (a code can differ by one from the reference's at an exact tie).

    Centred (asymmetric) weights add ``c_o·s_w[o]·s_x·S`` with the window sums ``S`` of the
    codes (:func:`window_sum`, a channel sum and a box filter: cheap beside the conv).

    On a CPU without VNNI, where oneDNN's u8 × s8 pairs saturate, 8-bit layers run two weight
    planes whose float32 outputs add (fxquant/lower/int8_pairs.py); a fused uint8 output is
    then quantized after the sum, as the reference does."""

    target = "cpu"
    channels_last = True

    def __getstate__(self):  # the packed weight is opaque (no storage): rebuilt, not copied
        state = dict(self.__dict__)
        state.pop("_packed", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.prepare()

    def prepare(self) -> None:
        self._corrected = bool((self.weight_centre != 0).any())
        # per-channel input zero points: oneDNN takes one, so it runs on the raw codes (zero
        # point 0); the taps' sum rides in the bias and the border strips are added after
        self._zp_taps = self.zero_point_taps() if self.per_channel_input else None
        x_zp = 0 if self.per_channel_input else int(self.input_zero_point)
        # two weight planes where this CPU's int8 pairs could saturate (fxquant/lower/int8_pairs.py)
        planes = split_weight_codes(self.weight_codes) \
            if needs_split(self.qmax, self.weight_codes) else [self.weight_codes]
        self._packed = [torch.ops.onednn.qconv_prepack(
            plane.contiguous(), self.weight_scale.float().contiguous(),
            float(self.input_scale), x_zp, list(self.stride),
            list(self.padding), list(self.dilation), self.groups, None) for plane in planes]
        self._scale = self.weight_scale.float().contiguous()
        self._zero_points = torch.zeros(self.out_channels, dtype=torch.int64)
        bias = self.bias.float() if self.bias is not None else None
        if self._zp_taps is not None:
            interior = self._zp_taps.sum((1, 2))
            bias = interior if bias is None else bias + interior
        self._bias = None if bias is None else bias.contiguous()
        self._x_scale, self._x_zp = float(self.input_scale), x_zp
        self._out_scale, self._out_zp = float(self.output_scale), int(self.output_zero_point)
        self._out_qmax, self._out_attr = int(self.output_qmax), \
            "relu" if bool(self.output_relu) else "none"

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        q = pad_codes(codes, self.pre_pad, self.pad_mode) \
            .contiguous(memory_format=torch.channels_last)  # no copy when already NHWC
        if self._out_scale > 0 and len(self._packed) == 1:  # uint8 codes for the next conv
            y = torch.ops.onednn.qconv_pointwise(
                q, self._x_scale, self._x_zp, self._packed[0], self._scale, self._zero_points,
                self._bias, list(self.stride), list(self.padding), list(self.dilation),
                self.groups, self._out_scale, self._out_zp, torch.uint8, self._out_attr, [None], "")
            return y if self._out_qmax == 255 else torch.clamp(y, max=self._out_qmax)
        y = None
        for k, packed in enumerate(self._packed):  # split weight planes: their outputs add
            part = torch.ops.onednn.qconv_pointwise(
                q, self._x_scale, self._x_zp, packed, self._scale, self._zero_points,
                self._bias if k == 0 else None, list(self.stride), list(self.padding),
                list(self.dilation), self.groups, 1.0, 0, torch.float32, "none", [None], "")
            y = part if y is None else y.add_(part)
        if self._out_scale > 0:  # the fused epilogue's codes, computed after the planes' sum
            y = torch.relu(y) if self._out_attr == "relu" else y
            return quantize_codes(y, self._out_scale, self._out_zp, self._out_qmax)
        if self._zp_taps is not None and any(self.padding):
            y = self.add_zero_point_border(y, q.shape[2:])
        if not self._corrected:
            return y
        return self.add_centring(y, self.window_sum(q, torch.float32))  # S exact below 2^24

    def add_zero_point_border(self, y: torch.Tensor, size) -> torch.Tensor:
        """The zero-point term where a tap falls in the padding (interior: in the bias)."""
        rows, cols = self.tap_masks(size, torch.float32, y.device)
        return add_border(y, self._zp_taps.unsqueeze(0), rows, cols)


TARGETS = {"reference": ReferenceConv2d, "cpu": CpuConv2d}  # "gpu" added by triton_conv
