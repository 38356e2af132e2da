"""``quantize``: replace observers by uniform fake-quantizers and quantize conv weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from fxquant.errors import CalibrationError
from fxquant.graph import (OUTPUT_OBSERVER, OUTPUT_QUANTIZER, input_bits, replace_module_node,
                           select_layers)
from fxquant.observers import Observer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, swap_in_quant_conv
from fxquant.quant.fitting import activation_quantizer, weight_quantizer
from fxquant.recipe import check_pass_options


@register_pass
@dataclass(frozen=True)
class QuantizePass(Pass):
    """Uniform fake-quantization of every observed layer.

    Before::                                   After::

        x ──► c1_input_observer ──► c1 (Conv2d)     x ──► c1_input_quantizer ──► c1 (QuantConv2d)

    One quantizer per observed tensor (shared by the convs that read it, as the observers
    were). The activation quantizer takes its static range from the observer (min/max, percentile
    or MSE search, per the recipe); the conv becomes a :class:`QuantConv2d` whose weight is
    fake-quantized per output channel. ``w``/``a`` override the recipe's bit-widths; the
    first and last conv take ``layers.first_last_bits`` when it is set, the upsampling tail
    ``layers.tail_bits``. A conv-output observer
    (``observe{outputs=true}``) becomes a per-tensor ``<conv>_output_quantizer``.
    """

    name: ClassVar[str] = "quantize"
    w: int | None = None
    a: int | None = None

    def __post_init__(self):
        check_pass_options(self.name, {"w": self.w, "a": self.a})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe = ctx.recipe
        a_bits = self.a or recipe.activations.bits
        w_bits = self.w or recipe.weights.bits
        layer_bits = select_layers(gm, recipe.layers).bits  # first_last_bits, tail_bits
        activations = weights = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            observer = gm.get_submodule(node.target)
            if not isinstance(observer, Observer):
                continue
            if str(node.target).endswith(OUTPUT_OBSERVER):  # observe{outputs=true}
                if not observer.has_data and ctx.calibrate:
                    raise CalibrationError(f"observer '{node.target}' saw no calibration data")
                replace_module_node(gm, node, activation_quantizer(observer, a_bits, None),
                                    str(node.target).replace(OUTPUT_OBSERVER, OUTPUT_QUANTIZER))
                activations += 1
                continue
            consumers = list(node.users)
            convs = [gm.get_submodule(c.target) for c in consumers]
            channels = convs[0].in_channels if recipe.activations.granularity == "per-channel" else None
            bits = input_bits(layer_bits, consumers, a_bits)
            quantizer = activation_quantizer(observer, bits, channels)
            if not observer.has_data and ctx.calibrate:
                raise CalibrationError(f"observer '{node.target}' saw no calibration data: "
                                       "is the layer reached by the forward pass?")
            name = str(node.target).replace("_input_observer", "_input_quantizer")
            replace_module_node(gm, node, quantizer, name)
            activations += 1
            for consumer, conv in zip(consumers, convs):
                if isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantConv2d):
                    swap_in_quant_conv(gm, consumer.target, weight_quantizer(
                        conv, recipe.weights, layer_bits.get(consumer.name, w_bits)))
                    weights += 1
        gm.recompile()
        info = {"activation_quantizers": activations, "weight_quantizers": weights}
        if recipe.layers.first_last_bits or recipe.layers.tail_bits:
            info["layer_bits"] = dict(layer_bits)  # {} says the model had no such layers
        return PassResult(gm, bool(activations), info)
