"""The lower pass's graph rewrites for the ``cpu`` target: each moves work to a cheaper form
with bit-identical results (uint8 codes instead of floats through shuffles and concats, ATen
kernels that beat Inductor's, a transposed conv as a conv)."""

from __future__ import annotations

import torch
from torch import fx

from fxquant.graph import is_relu, module_of, pixel_shuffle_factor, replace_module_node
# importing fxquant.lower.ops registers fxquant::pixel_shuffle(_phase_major) and ::upsample
from fxquant.lower.ops import phase_major_order
from fxquant.lower.conv import CpuConv2d
from fxquant.lower.daq import DaqQuantize
from fxquant.lower.folded import CpuDaqConv2d
from fxquant.lower.subset import SubsetQuantize
from fxquant.lower.subpixel import SubpixelConvTranspose2d, convertible
from fxquant.lower.uniform_codes import IntegerDequantize, IntegerQuantize

__all__ = ["dynamic_cat_pieces", "phase_major_shuffles", "quantize_cat_pieces",
           "route_pixel_shuffles", "route_smooth_upsampling", "subpixel_deconvs"]


def route_pixel_shuffles(gm: fx.GraphModule) -> None:
    """Every pixel shuffle becomes ``fxquant::pixel_shuffle`` (ATen's channels-last kernel,
    opaque to Inductor: fxquant/lower/ops.py), and it shuffles uint8 codes instead of floats
    where the order does not matter (quantization is elementwise with one scale, and so are a
    dequantization and a ReLU): a shuffle whose only reader is a quantizer moves behind it,
    and one that reads a dequantized conv output (directly or through ReLUs) moves in front
    of the dequantization."""
    for node in list(gm.graph.nodes):
        factor = pixel_shuffle_factor(gm, node)
        if factor is None:
            continue
        source, users = node.args[0], list(node.users)
        quantize = users[0] if len(users) == 1 and isinstance(module_of(gm, users[0]),
                                                               IntegerQuantize) else None
        if quantize is not None and module_of(gm, quantize).channels is not None:
            quantize = None  # per-channel codes: the shuffle mixes channels, it stays in front
        with gm.graph.inserting_before(node):
            if quantize is None and _shuffle_before_dequantize(gm, node, factor):
                continue  # it erased the shuffle
            if quantize is not None:
                codes = gm.graph.call_module(quantize.target, (source,))
                shuffled = gm.graph.call_function(torch.ops.fxquant.pixel_shuffle, (codes, factor))
                quantize.replace_all_uses_with(shuffled)
                gm.graph.erase_node(quantize)
            else:
                shuffled = gm.graph.call_function(torch.ops.fxquant.pixel_shuffle, (source, factor))
                node.replace_all_uses_with(shuffled)
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def _shuffle_before_dequantize(gm: fx.GraphModule, shuffle: fx.Node, factor: int) -> bool:
    """``shuffle(relu…(dequantize(codes)))`` with single readers all along becomes
    ``relu…(dequantize(shuffle(codes)))``: the shuffle moves a byte per value, not four.
    Returns False (graph untouched) where the pattern does not hold."""
    chain, node = [], shuffle.args[0]
    while is_relu(gm, node) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    if not isinstance(module_of(gm, node), IntegerDequantize) or len(node.users) != 1:
        return False
    value = gm.graph.call_function(torch.ops.fxquant.pixel_shuffle, (node.args[0], factor))
    value = gm.graph.call_module(node.target, (value,))
    for relu in reversed(chain):
        value = gm.graph.node_copy(relu, lambda _arg, v=value: v)
    shuffle.replace_all_uses_with(value)
    for old in (shuffle, *chain, node):  # each one's only reader is gone by now
        gm.graph.erase_node(old)
    return True


def route_smooth_upsampling(gm: fx.GraphModule) -> None:
    """``F.interpolate(x, scale_factor=s, mode='bilinear'|'bicubic')`` (an SR model's global
    skip) becomes ``fxquant::upsample``: ATen's kernel, opaque to Inductor (fxquant/lower/ops.py)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.nn.functional.interpolate:
            continue
        kwargs = {k: v for k, v in node.kwargs.items()  # the defaults FX records
                  if not (k in ("size", "recompute_scale_factor") and v is None
                          or k == "antialias" and v is False)}
        scale, mode = kwargs.get("scale_factor"), kwargs.get("mode", "nearest")
        if len(node.args) != 1 or set(kwargs) - {"scale_factor", "mode", "align_corners"} \
                or not isinstance(scale, (int, float)) or mode not in ("bilinear", "bicubic"):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.fxquant.upsample, (
                node.args[0], float(scale), mode, bool(kwargs.get("align_corners") or False)))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def subpixel_deconvs(gm: fx.GraphModule) -> int:
    """Every float strided ``ConvTranspose2d`` becomes the same products as a conv followed by
    a pixel shuffle (fxquant/lower/subpixel.py): oneDNN's CPU transposed conv is several
    times slower than its conv for the 1-channel SR tails that use one."""
    converted = 0
    for node in list(gm.graph.nodes):
        deconv = module_of(gm, node)
        if deconv is not None and convertible(deconv):
            replace_module_node(gm, node, SubpixelConvTranspose2d.from_conv_transpose(deconv),
                                str(node.target).replace(".", "_") + "_subpixel")
            converted += 1
    return converted


def _concat_of(node) -> tuple[list[fx.Node] | None, int]:
    """``(pieces, dim)`` when ``node`` is a ``torch.cat`` of graph values, else ``(None, 0)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and node.target in (torch.cat, torch.concat)):
        return None, 0
    pieces = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, fx.Node) for p in pieces):
        return None, 0
    return list(pieces), dim


def quantize_cat_pieces(gm: fx.GraphModule) -> int:
    """``quantize(cat(xs))`` with a per-tensor quantizer becomes ``cat(quantize(x) for x in
    xs)``: the same codes (quantization is elementwise with one scale), but the concat moves a
    byte per value instead of Inductor writing the float concat out and reading it back
    (IMDN's 384-channel concat: a 25 MB float buffer at 128×128), and each piece's
    quantization fuses into the op that makes it. Returns the number of concats rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        quantize = module_of(gm, node)
        if not isinstance(quantize, IntegerQuantize) or quantize.channels is not None:
            continue
        cat = node.args[0]
        pieces, dim = _concat_of(cat)
        if pieces is None:
            continue
        with gm.graph.inserting_before(node):
            codes = [gm.graph.call_module(node.target, (piece,)) for piece in pieces]
            joined = gm.graph.call_function(torch.cat, (codes,), {"dim": dim})
        node.replace_all_uses_with(joined)
        gm.graph.erase_node(node)
        if not cat.users:
            gm.graph.erase_node(cat)
        rewritten += 1
    return rewritten


def dynamic_cat_pieces(gm: fx.GraphModule) -> int:
    """``codes(cat(xs, dim=1))`` becomes ``codes(xs)`` for DAQ's and DFSQ's quantizers
    (:class:`~fxquant.lower.daq.DaqQuantize`, :class:`~fxquant.lower.subset.SubsetQuantize`):
    their statistics and parameters are per (image, channel), so the codes of the
    concatenation are each piece's codes side by side; the quantizer reads every piece where
    it lies and concatenates uint8 codes, instead of Inductor writing the float concat out
    and reducing over it (IMDN's 384-channel concat: DAQ 1.09–1.36× on the whole one-plane
    model, tools/daq_bench_planes.py; DFSQ's codes of it in half the time,
    docs/performance.md). Exact. Returns the number rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if not isinstance(module_of(gm, node), (DaqQuantize, SubsetQuantize)):
            continue
        cat = node.args[0]
        pieces, dim = _concat_of(cat)
        if pieces is None or dim not in (1, -3):
            continue
        node.args = (pieces,)
        if not cat.users:
            gm.graph.erase_node(cat)
        rewritten += 1
    return rewritten


def phase_major_shuffles(gm: fx.GraphModule) -> int:
    """A pixel shuffle whose input is an integer conv's output (floats, or its fused uint8
    codes; DAQ's and DFSQ's per-image folded convs too) read by nothing else: the conv's
    output channels are permuted from ``c·r² + i·r + j`` to ``(i·r + j)·C + c`` and the
    shuffle becomes ``fxquant::pixel_shuffle_phase_major`` (fxquant/lower/ops.py), which
    moves runs of ``r·C`` contiguous values out of the NHWC conv output instead of gathering
    them one by one. Exact (:meth:`~fxquant.lower.conv.IntegerConv2d.permute_outputs`,
    :meth:`~fxquant.lower.folded.DaqConv2d.permute_outputs`). Run
    after the uint8 fusion, so that a fused conv's codes are covered too; groups of 1 only
    (a permutation across groups would mix them). Returns the number of shuffles rewritten."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.fxquant.pixel_shuffle:
            continue
        source, factor = node.args[0], node.args[1]
        conv = module_of(gm, source)
        if not isinstance(conv, (CpuConv2d, CpuDaqConv2d)) or conv.groups != 1 \
                or len(source.users) != 1:
            continue
        conv.permute_outputs(phase_major_order(conv.out_channels // (factor * factor), factor))
        node.target = torch.ops.fxquant.pixel_shuffle_phase_major
        rewritten += 1
    return rewritten
