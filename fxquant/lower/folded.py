"""The per-image folded conv shared by the dynamic quantizers (DAQ: fxquant/lower/daq.py,
DFSQ: fxquant/lower/subset.py). Their conv input is ``x̂ = Δ_{n,c}·q + β_{n,c}`` with integer
codes ``q`` and a per-(image, channel) step and offset; the conv is

    y_n = Σ_c (Ŵ[:, c]·Δ_{n,c}) ⋆ q_{n,c}  +  Σ_c Ŵ[:, c] ⋆ (β_{n,c}·1_{H×W})  +  bias

— per-image folded weights on the codes, and the conv of a constant plane per channel with
zero padding, computed exactly and separably (see fxquant/lower/daq.py's docstring for the
algebra and the targets: ``reference`` in float64, ``cpu`` with int8 weight planes on oneDNN;
``gpu``, fxquant/lower/triton_conv.py, with the Triton kernel). A codes module returns
``(codes, Δ, β, ĉ)``; codes are uint8, integer-valued (split into uint8 planes here) or a
list of uint8 planes ``q = Σ_k 256^k·plane_k``; ``ĉ`` may be None.

``ĉ`` (the statistics' ``(μ − β)/Δ``) is about each (image, channel)'s mean code. Where
the folded weights are requantized to int8 (``cpu``, ``gpu``), ``W' = W_q + E``, the conv
computes ``W_q ⋆ q + E ⋆ ĉ·1`` — the second term a constant plane, added with the offset
term's own exact border algebra — so only ``E ⋆ (q − ĉ)`` is lost, not ``E ⋆ q``: a signed
4-bit channel's codes sit about 7.5 from zero and a few from their mean, and the one-plane
layer error falls 2–3× (docs/lowering.md, "DAQ lowered vs fake-quant").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import PassError
from fxquant.graph import replace_module_node
from fxquant.lower.border import BorderTaps, add_border
from fxquant.lower.conv import INT32_MAX, LoweringError, permute_output_buffers
from fxquant.lower.int8_pairs import int8_pairs_saturate, needs_split, split_weight_codes
from fxquant.lower.padding import lowered_padding, pad_codes
from fxquant.lower.planes import code_planes, code_values, plane_shape

U8_MAX, INT8_MAX = 255, 127

def onednn_accumulator_bound(fan_in: int) -> int:
    """Largest |int32 accumulator| of the cpu DAQ conv: uint8 codes (one plane, <= 255) times
    int8 folded-weight codes (<= 127 in magnitude) over the fan-in."""
    return fan_in * U8_MAX * INT8_MAX


NON_FINITE = ("DAQ input has channels whose statistics overflow float: they pass through "
              "unquantized and have no integer form")


# --------------------------------------------------------------------------- convs
class DaqConv2d(BorderTaps, nn.Module):
    """A conv reading per-(image, channel) dequantized codes ``x̂ = Δ_{n,c}·q + β_{n,c}``
    (DAQ's here, DFSQ's from fxquant/lower/subset.py). State shared by the targets: integer
    weight codes ``K`` (int16; odd for DAQ's mid-rise grid), the weight step ``Δ_w/2``
    broadcastable to them (per tensor, per output channel, or per (o, c) under mixed
    precision), bias, conv geometry. ``state_dict`` round-trips."""

    target = ""
    channels_last = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding,
                 dilation, groups: int, has_bias: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.source = ""
        # a padding mode other than zeros pads the input codes first (fxquant/lower/padding.py)
        self.pre_pad, self.pad_mode = None, "zeros"
        shape = (out_channels, in_channels // groups) + self.kernel_size
        self.register_buffer("weight_codes", torch.zeros(shape, dtype=torch.int16))
        self.register_buffer("weight_scale", torch.ones(shape[:2] + (1, 1)))
        self.register_buffer("bias", torch.zeros(out_channels) if has_bias else None)

    @classmethod
    def from_quantized(cls, conv, source: str = "") -> "DaqConv2d":
        padding, pre_pad, mode = lowered_padding(conv)
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    padding, conv.dilation, conv.groups, conv.bias is not None)
        layer.source, layer.pre_pad, layer.pad_mode = source, pre_pad, mode
        # Ŵ = (c − z)·Δ_w = (2c − 2z)·Δ_w/2: DAQ's mid-rise z = ½ gives odd integer codes,
        # an integer z (DFSQ's affine weights) even ones; both exact
        codes = conv.weight_quantizer.integer_codes(conv.weight)
        doubled = 2 * torch.as_tensor(codes.zero_point, dtype=torch.float64)
        if not bool((doubled == doubled.round()).all()):
            raise LoweringError("weight zero points must be integers or halves to lower")
        with torch.no_grad():
            layer.weight_codes.copy_((2 * codes.codes.long() - doubled.long()).to(torch.int16))
            layer.weight_scale.copy_((codes.scale / 2).expand_as(layer.weight_scale))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.detach())
        return layer

    # output channel k computes the conv's channel output_order[k] (set by the lower pass's
    # phase-major shuffle rewrite, passes/lower_rewrites.py); None: the conv's own order
    output_order: torch.Tensor | None = None

    def permute_outputs(self, order: torch.Tensor) -> None:
        """Compute output channel ``order[k]`` of the conv as channel ``k``: its weight codes,
        their step and its bias move together. Each output channel's fold, int8
        requantization (one scale per image and output channel) and offset term are its own,
        so no value changes; recorded in :attr:`output_order`."""
        permute_output_buffers(self, ("weight_codes", "weight_scale", "bias"), order)

    @staticmethod
    def code_limit() -> int:
        """The largest balanced input code this target's conv takes (fxquant/lower/daq.py,
        "Balanced codes"); 0: codes as they are (``reference``: its fold is exact)."""
        return 0

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The de-quantized weight ``Ŵ = K·Δ_w/2`` (exact in float64)."""
        return self.weight_codes.to(dtype) * self.weight_scale.to(dtype)

    def per_output(self, t: torch.Tensor) -> torch.Tensor:
        """Per-(image, input channel) N×C×1×1 → N×O×(C/g)×1×1, each output channel seeing
        the input channels of its group."""
        n, g = t.shape[0], self.groups
        per_group, o_g = self.in_channels // g, self.out_channels // g
        t = t.reshape(n, g, 1, per_group).expand(n, g, o_g, per_group)
        return t.reshape(n, self.out_channels, per_group, 1, 1)

    def folded_weight(self, step: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per-image weights ``Ŵ[o, c]·Δ_{n,c}``: N×O×(C/g)×k_h×k_w."""
        return weight.unsqueeze(0) * self.per_output(step.to(weight.dtype))

    def offset_taps(self, offset: torch.Tensor, weight: torch.Tensor, size):
        """``V[n,o,i,j] = Σ_c β_{n,c}·Ŵ[o,c,i,j]`` and the row/column tap masks (k × out)."""
        n, g = offset.shape[0], self.groups
        per_group, o_g = self.in_channels // g, self.out_channels // g
        beta = offset.to(weight.dtype).reshape(n, g, 1, per_group, 1, 1)
        v = (beta * weight.reshape(1, g, o_g, per_group, *self.kernel_size)).sum(3)
        v = v.reshape(n, self.out_channels, *self.kernel_size)
        rows, cols = self.tap_masks(size, weight.dtype, weight.device)
        return v, rows, cols

    def offset_term(self, offset: torch.Tensor, weight: torch.Tensor, size) -> torch.Tensor:
        """``Σ_c Ŵ[:, c] ⋆ (β_c·1)`` with zero padding, exactly (see the module doc)."""
        v, rows, cols = self.offset_taps(offset, weight, size)
        return torch.einsum("noyj,jx->noyx", torch.einsum("noij,iy->noyj", v, rows), cols)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"DAQ codes x odd int weight codes, per-image fold"
                + (f", codes padded {self.pad_mode} {self.pre_pad}" if self.pre_pad else ""))

    def describe(self) -> dict:
        return {"target": self.target, "kind": "daq"}


class ReferenceDaqConv2d(DaqConv2d):
    """The exact semantics: per-image folded weights (float64) ⋆ integer codes + the
    border-exact offset term + bias, in float64; float32 output."""

    target = "reference"

    def forward(self, packed) -> torch.Tensor:
        codes, step, offset, _ = packed  # exact: no requantization error to charge ĉ with
        codes = pad_codes(codes, self.pre_pad, self.pad_mode)
        n, c, h, w = codes.shape
        weight = self.weight(torch.float64)
        folded = self.folded_weight(step, weight)
        y = F.conv2d(codes.double().reshape(1, n * c, h, w),
                     folded.reshape(n * self.out_channels, *folded.shape[2:]), None,
                     self.stride, self.padding, self.dilation, n * self.groups)
        y = y.reshape(n, self.out_channels, *y.shape[2:]) + self.offset_term(offset, weight, (h, w))
        if self.bias is not None:
            y = y + self.bias.double().view(1, -1, 1, 1)
        return y.float()


def planes_value(plane: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The float32 weights an int8 plane ``(codes N×O×…, scale N×O)`` stands for."""
    codes, scale = plane
    return codes.float() * scale[:, :, None, None, None]


def requantize_folded(folded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(image, output channel) symmetric int8 codes of the folded weights
    (N×O×C/g×k×k): ``scale = max|W'|/127``, ``codes = round(W'/scale)``. Lossy: a channel
    whose ``Δ_{n,c}`` is small against the largest keeps few int8 levels."""
    top = folded.abs().amax(dim=(2, 3, 4))
    scale = torch.where(top > 0, top / INT8_MAX, torch.ones_like(top))
    codes = torch.round(folded / scale[:, :, None, None, None]).clamp_(-INT8_MAX, INT8_MAX)
    return codes.to(torch.int8), scale


class CpuDaqConv2d(DaqConv2d):
    """oneDNN int8 conv of uint8 NHWC codes with per-image requantized folded weights
    (prepacked on every call), float32 output, plus the offset term in float32."""

    target = "cpu"
    channels_last = True

    @staticmethod
    def code_limit() -> int:
        """All of uint8, or 128 where this CPU's int8 pairs saturate (codes up to 128 keep
        every pair below 32 767, so balancing adds no weight split)."""
        return 128 if int8_pairs_saturate() else 255
    # int8 planes of the folded weights: 1 = W' ≈ s1·K1 (error <= s1/2 = max|W'|/254 per
    # weight: up to 0.1 dB on Set5); 2 (default) adds the residual, W' ≈ s1·K1 + s2·K2 with
    # s2 <= s1/254 (error <= max|W'|/64 516), at the price of a second u8 × s8 conv
    weight_planes = 2
    # a map of at most this many pixels per image is convolved in float32 from the
    # dequantized codes (:meth:`dequantized_conv`): at 1×1 (IMDN's channel attention) the
    # int8 conv is a few hundred MACs and its per-image fold, prepack and border strips
    # about a millisecond
    small_map = 64

    @torch.compiler.disable  # per-image prepack: eager (lower{compile=true} compiles the rest)
    def forward(self, packed, prepared=None) -> torch.Tensor:
        """``prepared``: :meth:`prepare`'s value for ``packed`` where the graph computes it
        before this call (``fold_in_region``, passes/lower_rewrites.py), made here if None:
        a small map's output, or the fold the int8 conv takes."""
        self.refuse_non_finite(packed[1])
        if prepared is None:
            prepared = self.prepare(packed)
        if isinstance(prepared, torch.Tensor):
            return prepared
        return self.integer_conv(packed, prepared)

    def small(self, packed) -> bool:
        """Whether ``packed``'s map has at most :attr:`small_map` pixels per image."""
        h, w = plane_shape(packed[0])[-2:]
        return h * w <= self.small_map

    def prepare(self, packed):
        """A small map's output (:meth:`dequantized_conv`), else :meth:`folded_planes` for
        ``packed``'s codes: traceable, so that under lower{compile=true} the per-image fold
        (some twenty small ops), or the whole float conv of a small map, runs in the compiled
        region before the conv's eager call."""
        if self.small(packed):
            return self.dequantized_conv(packed)
        codes, step, offset, centre = packed
        h, w = plane_shape(codes)[-2:]
        if self.pre_pad is not None:
            left, right, top, bottom = self.pre_pad
            h, w = h + top + bottom, w + left + right
        return self.folded_planes(step, offset, (h, w), centre)

    def dequantized_conv(self, packed) -> torch.Tensor:
        """The conv of ``x̂ = Δ·q + β`` with the de-quantized weights in float32: the
        reference semantics without the int8 requantization of the fold (so closer to it
        than :meth:`integer_conv`)."""
        codes, step, offset, _ = packed
        x = pad_codes(code_values(codes).float() * step + offset, self.pre_pad, self.pad_mode)
        bias = None if self.bias is None else self.bias.float()
        return F.conv2d(x, self.weight(torch.float32), bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def integer_conv(self, packed, folded) -> torch.Tensor:
        """oneDNN's u8 × s8 conv of the code planes with the per-image folded weights
        (``folded``: :meth:`prepare`'s), the offset term's border strips added after it."""
        planes = pad_codes(code_planes(packed[0]), self.pre_pad, self.pad_mode)
        n, _, h, w = planes[0].shape
        wplanes, (v, rows, cols), bias = folded
        outs = []
        for i in range(n):
            y = None
            for j, (wcodes, wscale) in enumerate(wplanes):
                image_planes = [plane[i:i + 1] for plane in planes]
                for k, part in enumerate(self.image_conv(image_planes, wcodes[i], wscale[i],
                                                         bias[i] if j == 0 else None)):
                    y = part if y is None else y.add_(part, alpha=float(256 ** k))
            outs.append(y)
        y = outs[0] if n == 1 else torch.cat(outs)
        return add_border(y, v, rows, cols, self.strips((h, w), rows.dtype, rows.device))

    @staticmethod
    def refuse_non_finite(step: torch.Tensor) -> None:
        """Channels whose statistics overflowed come with a NaN step (``daq_input_codes``,
        not strict): refused by name (a host read)."""
        if bool(torch.isnan(step).any()):
            raise LoweringError(NON_FINITE)

    def folded_planes(self, step: torch.Tensor, offset: torch.Tensor, size,
                      centre: torch.Tensor | None = None):
        """``(weight planes, offset taps, bias)`` for images of ``size``: the per-image folded
        weights requantized to ``weight_planes`` int8 planes ``[(codes, scale), ...]`` (a
        plane's codes N×O×C/g×k×k, its scale N×O), :meth:`offset_taps`, and the per-image
        bias N×O — the offset plane's interior value plus the conv's bias; the border strips
        are added after the conv (:func:`add_border`). ``centre`` (N×C×1×1, the codes'
        expected value ĉ): the planes' error on a constant ĉ plane is charged to the offset
        taps (module doc)."""
        weight = self.weight(torch.float32)
        folded = self.folded_weight(step.float(), weight)
        wplanes = [requantize_folded(folded)]
        residual = folded - planes_value(wplanes[0])
        if self.weight_planes > 1:
            wplanes.append(requantize_folded(residual))
            residual = residual - planes_value(wplanes[1])
        v, rows, cols = self.offset_taps(offset.float(), weight, size)
        if centre is not None:  # + Σ_c E[:, c]·ĉ_c per tap, E = W' − the planes' value
            v = v + (residual * self.per_output(centre.float())).sum(2)
        bias = v.sum((2, 3)) if self.bias is None else v.sum((2, 3)) + self.bias.float()
        return wplanes, (v, rows, cols), bias

    def image_conv(self, planes: list[torch.Tensor], wcodes: torch.Tensor, wscale: torch.Tensor,
                   bias: torch.Tensor | None) -> list[torch.Tensor]:
        """One image's code planes (1×C×H×W uint8 NHWC each) convolved with one int8 weight
        plane (O×C/g×k×k, per-output scale ``wscale``): float32 ``Σ q·K·s_w [+ bias]`` per
        code plane (``bias`` added to the first only)."""
        # where this CPU's int8 pairs could saturate, two weight planes of |k| <= 64
        # (fxquant/lower/int8_pairs.py); the codes' largest value decides, read only then
        code_max = max(int(plane.max()) for plane in planes) if int8_pairs_saturate() else 0
        parts = split_weight_codes(wcodes) if needs_split(code_max, wcodes) else [wcodes]
        # with the input shape oneDNN can pick its weight layout for this call
        packed = [torch.ops.onednn.qconv_prepack(
            part.contiguous(), wscale.contiguous(), 1.0, 0, list(self.stride),
            list(self.padding), list(self.dilation), self.groups, [1, *planes[0].shape[1:]])
            for part in parts]
        zero_points = torch.zeros(self.out_channels, dtype=torch.int64)
        outs = []
        for k, plane in enumerate(planes):
            y = None
            for j, packed_w in enumerate(packed):
                part = torch.ops.onednn.qconv_pointwise(
                    plane, 1.0, 0, packed_w, wscale.contiguous(), zero_points,
                    bias.contiguous() if k == 0 and j == 0 and bias is not None else None,
                    list(self.stride), list(self.padding), list(self.dilation), self.groups,
                    1.0, 0, torch.float32, "none", [None], "")
                y = part if y is None else y.add_(part)
            outs.append(y)
        return outs


LAYERS = {"reference": ReferenceDaqConv2d, "cpu": CpuDaqConv2d}  # "gpu" added by triton_conv


def lower_folded(gm: fx.GraphModule, node: fx.Node, codes: nn.Module, target: str,
                 pass_name: str, method: str, check_weights, planes: int = 2) -> int:
    """Replace quantizer ``node`` by ``codes`` (a module returning ``(codes, Δ, β)``) and each
    QuantConv2d it feeds by the target's per-image folded conv (``planes`` int8 weight
    planes where the target requantizes); ``check_weights(node, conv)`` refuses weights the
    method cannot lower. Returns how many convs were lowered."""
    from fxquant.quant import QuantConv2d

    users = list(node.users)
    modules = [gm.get_submodule(u.target) if u.op == "call_module" else None for u in users]
    bad = [u for u, m in zip(users, modules) if not isinstance(m, QuantConv2d)
           or u.args[0] is not node or node in list(u.args[1:]) + list(u.kwargs.values())]
    if bad or not users:
        what = ", ".join(f"{u.name} ({type(m).__name__ if m is not None else u.target})"
                         for u, m in zip(users, modules) if u in bad) or "nothing"
        raise PassError(pass_name, f"{method}-quantized value feeds {what}, which has no "
                        f"integer kernel; {method} lowers in front of a Conv2d only",
                        node=node.name)
    layer_cls = LAYERS[target]
    layers = []
    for user, conv in zip(users, modules):
        check_weights(user, conv)
        if target == "cpu" and onednn_accumulator_bound(_fan_in(conv)) > INT32_MAX:
            raise PassError(pass_name, f"fan-in {_fan_in(conv)} can overflow oneDNN's int32 "
                            "accumulator (bound fan-in·255·127 < 2^31)", node=user.name)
        try:
            layers.append(layer_cls.from_quantized(conv, str(user.target)))
        except LoweringError as exc:
            raise PassError(pass_name, str(exc), node=user.name) from None
        if hasattr(layers[-1], "weight_planes"):
            layers[-1].weight_planes = planes
    replace_module_node(gm, node, codes, str(node.target).replace("_quantizer", "_codes"))
    for user, layer in zip(users, layers):
        replace_module_node(gm, user, layer, str(user.target).replace(".", "_"))
    return len(layers)


def _fan_in(conv) -> int:
    return conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
