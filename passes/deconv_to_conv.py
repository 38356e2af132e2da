"""``deconv-to-conv``: each transposed conv becomes a conv and a pixel shuffle, so it quantizes."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import fx, nn

from fxquant.graph import FROM_TRANSPOSED, module_of
from fxquant.lower.subpixel import as_subpixel_conv, subpixel_refusal
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass


@register_pass
@dataclass(frozen=True)
class DeconvToConvPass(Pass):
    """Replace each ``ConvTranspose2d`` by the ``Conv2d`` with ``C_out·s²`` outputs whose pixel
    shuffle equals it (the sub-pixel convolution identity; fxquant/lower/subpixel.py).

    Before::

        x ──► up{ConvTranspose2d(C, C', k, stride=s, padding=p)} ──► relu

    After::

        x ──► up_subpixel{Conv2d(C, C'·s², k')} ──► pixel_shuffle(s) ──► [crop] ──► relu

    The conv module keeps the transposed conv's name (``up``), so ``layers.include`` and
    ``exclude`` patterns still match it; its call is named ``<call>_subpixel``. The crop (a
    slice) appears only where the conv's equal padding computes rows or columns beyond the
    transposed conv's output. Every quantizing pass, and every lowering target, then treats
    the layer as any other conv: this is how ``layers.op_types = ["conv2d",
    "conv_transpose2d"]`` quantizes transposed convs (the recipe puts this pass right after
    ``trace``). Outputs are unchanged up to float rounding (the same products,
    summed in another order). Transposed convs with groups, dilation, non-zero padding modes
    or unequal strides have no such form: they stay float, each named with the reason in the
    result's ``kept_float``.
    """

    name: ClassVar[str] = "deconv-to-conv"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        converted, kept, done = [], {}, {}
        # every call site first: a module called twice is converted once, read twice
        calls = [(n, module_of(gm, n)) for n in gm.graph.nodes]
        for node, deconv in calls:
            if not isinstance(deconv, nn.ConvTranspose2d):
                continue
            why = subpixel_refusal(deconv)
            if len(node.args) + len(node.kwargs) > 1:  # forward(x, output_size=...)
                why = "called with output_size, which sets its output padding per call"
            if why:
                kept[node.name] = why
                continue
            if node.target not in done:
                done[node.target] = as_subpixel_conv(deconv)
                setattr(done[node.target][0], FROM_TRANSPOSED, True)
                gm.add_submodule(str(node.target), done[node.target][0])
            _read_through_shuffle(gm, node, deconv.stride[0], done[node.target][1])
            converted.append(node.name)
        if converted:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(converted), {"converted": converted, "kept_float": kept})


def _read_through_shuffle(gm: fx.GraphModule, node: fx.Node, stride: int,
                          crops: tuple[int, int, int, int]) -> None:
    """Replace call ``node`` by a call of the (now conv) module named ``<node>_subpixel`` and
    make its readers read that through the pixel shuffle and the crop. The new name keeps
    the conv's phases apart from the transposed conv's output, which the float graph (the
    reconstruct pass's teacher) holds under the old one."""
    with gm.graph.inserting_before(node):
        last = conv = gm.graph.create_node("call_module", node.target, node.args, node.kwargs,
                                           name=f"{node.name}_subpixel")
    with gm.graph.inserting_after(conv):
        if stride > 1:
            last = gm.graph.call_function(F.pixel_shuffle, (last, stride))
    top, bottom, left, right = crops
    if any(crops):
        rows = slice(top or None, -bottom or None)
        cols = slice(left or None, -right or None)
        with gm.graph.inserting_after(last):
            last = gm.graph.call_function(operator.getitem, (last, (Ellipsis, rows, cols)))
    node.replace_all_uses_with(last)
    gm.graph.erase_node(node)
