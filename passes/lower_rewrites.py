"""The lower pass's graph rewrites for the ``cpu`` target: each moves work to a cheaper form
with bit-identical results (uint8 codes instead of floats through shuffles and concats, ATen
kernels that beat Inductor's, a transposed conv as a conv)."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fxquant.graph import is_relu, module_of, pixel_shuffle_factor, replace_module_node
# importing fxquant.lower.ops registers fxquant::pixel_shuffle(_phase_major) and ::upsample
from fxquant.lower.ops import phase_major_order
from fxquant.lower.conv import CpuConv2d
from fxquant.lower.daq import DaqQuantize
from fxquant.lower.folded import CpuDaqConv2d
from fxquant.lower.subset import SubsetQuantize
from fxquant.lower.subpixel import SubpixelConvTranspose2d, convertible
from fxquant.lower.uniform_codes import IntegerDequantize, IntegerQuantize

__all__ = ["dynamic_cat_pieces", "fold_in_region", "hoist_subset_pieces",
           "phase_major_shuffles", "quantize_cat_pieces", "route_pixel_shuffles",
           "route_smooth_upsampling", "split_before_activation", "subpixel_deconvs"]


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


def hoist_subset_pieces(gm: fx.GraphModule) -> int:
    """A DFSQ quantizer over channel pieces (:func:`dynamic_cat_pieces`) computes each
    piece's codes right after the op that makes the piece
    (:meth:`~fxquant.lower.subset.SubsetQuantize.piece_codes`) and only joins them where it
    stood (:meth:`~fxquant.lower.subset.SubsetQuantize.join_codes`): its statistics and points
    are per channel, so no piece waits for the others. Under ``lower{compile=true}`` each
    piece's statistics and codes then join the compiled region that makes the piece, which
    reads it while it is still in cache, instead of one region reading all of them back at
    the end (IMDN's six 64-channel block outputs before its 384-channel 1×1 conv). DAQ's
    codes are not hoisted: their balancing takes the largest step over all channels.
    Pieces whose channel counts the graph does not tell (:func:`channels_of`) stay as they
    are. Exact. Returns the number of quantizers rewritten.

    Before::

        add_1 = ...; ...; add_11 = ...
        codes = c_0_input_codes([add_1, ..., add_11])

    After::

        add_1 = ...; piece = c_0_input_codes.piece_codes(add_1, 0, 64); ...
        add_11 = ...; piece_5 = c_0_input_codes.piece_codes(add_11, 320, 384)
        codes = c_0_input_codes.join_codes([piece, ..., piece_5])
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        module = module_of(gm, node)
        if not isinstance(module, SubsetQuantize) or not isinstance(node.args[0], (list, tuple)):
            continue
        pieces = list(node.args[0])
        widths = [channels_of(gm, piece) for piece in pieces]
        if None in widths or sum(widths) != module.channels:
            continue
        parts, first = [], 0
        for piece, width in zip(pieces, widths):
            with gm.graph.inserting_after(piece):
                owner = gm.graph.get_attr(node.target)
            with gm.graph.inserting_after(owner):
                parts.append(gm.graph.call_method("piece_codes", (owner, piece, first,
                                                                  first + width)))
            first += width
        with gm.graph.inserting_before(node):
            joined = gm.graph.call_method("join_codes", (gm.graph.get_attr(node.target), parts))
        node.replace_all_uses_with(joined)
        gm.graph.erase_node(node)
        rewritten += 1
    return rewritten


def fold_in_region(gm: fx.GraphModule) -> int:
    """Each per-image folded conv of the cpu target (DAQ's, DFSQ's
    :class:`~fxquant.lower.folded.CpuDaqConv2d`) gets its fold as a node of its own before
    it (:meth:`~fxquant.lower.folded.CpuDaqConv2d.prepare`): the per-image folded weights,
    their int8 requantization, the offset taps and the bias, about twenty small ops (on a
    map of at most ``small_map`` pixels, the whole float conv). Under ``lower{compile=true}``
    they then run in the compiled region that makes the codes, instead of eagerly inside
    the conv, whose oneDNN call stays eager. Eager, the same ops in the same order: exact.
    Returns the number of convs rewritten.

    Before::

        codes = c2_input_codes(x);  c2_1 = self.c2(codes)

    After::

        codes = c2_input_codes(x);  prepare = c2.prepare(codes)
        c2_1 = self.c2(codes, prepare)
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        if type(module_of(gm, node)) is not CpuDaqConv2d or len(node.args) != 1 or node.kwargs:
            continue
        with gm.graph.inserting_before(node):
            owner = gm.graph.get_attr(node.target)
            folded = gm.graph.call_method("prepare", (owner, node.args[0]))
        node.args = (node.args[0], folded)
        rewritten += 1
    return rewritten


def split_before_activation(gm: fx.GraphModule) -> int:
    """``split(act(y), sizes, dim=1)`` becomes ``act`` on each piece of ``split(y, sizes,
    dim=1)``, for a stateless elementwise module ``act`` (:data:`_STATELESS`) whose only
    user is the split. Under ``lower{compile=true}`` each piece is then a value of its own:
    Inductor writes out only the pieces that leave the region (IMDN's 16 distilled channels,
    kept for the concat) and computes the rest inline where their statistics and codes read
    them, instead of writing the whole activation and reading the quantized 48 channels back
    twice. Exact (elementwise). Returns the number of splits rewritten.

    Before::

        act = IMDB1.act(c1);  split = split(act, (16, 48), dim=1)
        getitem = split[0];  getitem_1 = split[1]

    After::

        split = split(c1, (16, 48), dim=1)
        getitem = split[0];  act = IMDB1.act(getitem)
        getitem_1 = split[1];  act_1 = IMDB1.act(getitem_1)
    """
    rewritten = 0
    for split in list(gm.graph.nodes):
        if _channel_split(split) is None:
            continue
        act, pieces = split.args[0], list(split.users)
        if not isinstance(act, fx.Node) or not isinstance(module_of(gm, act), _STATELESS) \
                or len(act.users) != 1 or len(act.args) != 1 or act.kwargs \
                or not all(p.op == "call_function" and p.target is operator.getitem
                           for p in pieces):
            continue
        split.replace_input_with(act, act.args[0])
        for piece in pieces:
            with gm.graph.inserting_after(piece):
                applied = gm.graph.call_module(act.target, (piece,))
            piece.replace_all_uses_with(applied, delete_user_cb=lambda user: user is not applied)
        gm.graph.erase_node(act)
        rewritten += 1
    return rewritten


# stateless elementwise modules: the same function on every channel
_STATELESS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU,
              nn.Hardtanh, nn.Identity)
# modules that keep their input's channels (elementwise; PReLU's weights are per channel)
_ELEMENTWISE = _STATELESS + (nn.PReLU,)


def _channel_split(node) -> tuple[list | tuple | int, int] | None:
    """``(sizes, dim)`` of a ``torch.split`` call along the channels (dim 1), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" \
            or node.target not in (torch.split, torch.Tensor.split):
        return None
    args = dict(zip(("tensor", "sizes", "dim"), node.args))
    sizes = args.get("sizes", node.kwargs.get("split_size_or_sections"))
    dim = args.get("dim", node.kwargs.get("dim", 0))
    return (sizes, dim) if dim in (1, -3) else None
_BINARY = (operator.add, operator.mul, operator.sub, torch.add, torch.mul, torch.sub)


def channels_of(gm: fx.GraphModule, node, _depth: int = 0) -> int | None:
    """The channel count (dim 1) of ``node``'s value where the graph tells it: a module
    with ``out_channels`` (convs, lowered convs), an elementwise module, a binary add/mul/sub
    whose tensor operands all tell theirs (the widest: broadcasting), a piece of a split
    along dim 1 by sizes; None otherwise."""
    if not isinstance(node, fx.Node) or _depth > 32:
        return None
    module = module_of(gm, node)
    if module is not None:
        if isinstance(getattr(module, "out_channels", None), int):
            return module.out_channels
        return channels_of(gm, node.args[0], _depth + 1) if node.args and isinstance(
            module, _ELEMENTWISE) else None
    if node.op != "call_function":
        return None
    if node.target in _BINARY:
        widths = [channels_of(gm, a, _depth + 1) for a in node.args[:2]
                  if isinstance(a, fx.Node)]
        return max(widths) if widths and None not in widths else None
    if node.target is operator.getitem:
        split, index = node.args
        sizes = (_channel_split(split) or (None, None))[0]
        if isinstance(sizes, (list, tuple)) and isinstance(index, int):
            return int(sizes[index])
    return None


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
