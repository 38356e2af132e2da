"""How much of a quantized model's loss its activation ranges can win back: benchmark PSNR of
the float model with only the compiled model's activations quantized, once with the ranges
the recipe calibrated (the compiled model, weight quantizers off) and once with the tightest
clip-free ranges there are: each image's own min/max per channel, at the same bit width.

    python tools/activation_bound.py --model fsrcnn --scale 2 --recipe minmax-w8a8-perchannel

Per-image ranges clip nothing and fit each image exactly: no static range that clips
nothing is narrower. If this row still misses a target, clipping (a range search that trades
range for resolution) is the only range-side lever left; otherwise the bits fall short.

Prints one JSON row of PSNR differences from FP: weights only, static activations only,
per-image activations only, and with ``--per-layer`` each layer's static activations alone.
Set OMP_NUM_THREADS=1 beside other work.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from fxquant.analysis import quantized_layers
from fxquant.cli_args import add_model_source_args, models_from_source_args
from fxquant.errors import FxquantError
from fxquant.quant.base import quant_mode
from fxquant.quant.uniform import (UniformQuantizer, affine_qparams, fake_quantize,
                                   unsigned_range)


def per_image_fake_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` (N×C×H×W) fake-quantized on an affine ``bits`` grid spanning each (image,
    channel)'s own min/max, widened to contain 0 as the static activation quantizers are."""
    scale, zero_point = affine_qparams(x.amin((2, 3), keepdim=True),
                                       x.amax((2, 3), keepdim=True), bits)
    return fake_quantize(x, scale, zero_point, *unsigned_range(bits))


def activation_inputs(quant_model) -> dict[str, tuple[str, int]]:
    """The layers of a compiled model whose input one uniform quantizer feeds, by qualified
    name (as in the float model): that quantizer's name and bit width."""
    convs = {}
    for layer in quantized_layers(quant_model):
        quantizers = [quant_model.get_submodule(q) for q in layer.input_quantizers]
        if len(quantizers) == 1 and isinstance(quantizers[0], UniformQuantizer):
            convs[layer.name] = (layer.input_quantizers[0], quantizers[0].bits)
    if not convs:
        raise FxquantError("the compiled model has no layer whose input a uniform quantizer "
                           "feeds; valid: a model compiled with a uniform recipe")
    return convs


def quantize_inputs(float_model: nn.Module, convs: dict[str, int]) -> list:
    """Forward pre-hooks on ``float_model``'s convs named in ``convs`` that fake-quantize
    their input per image and channel; the caller removes the returned handles."""
    handles = []
    for name, bits in convs.items():
        try:
            conv = float_model.get_submodule(name)
        except AttributeError as exc:
            raise FxquantError(f"the float model has no module '{name}', which the compiled "
                               "model quantizes; give the float model it was compiled from") \
                from exc
        handles.append(conv.register_forward_pre_hook(
            lambda module, args, b=bits: (per_image_fake_quant(args[0], b), *args[1:])))
    return handles


def bound_row(models, dataset: str, data_root=None, per_layer: bool = False) -> dict:
    from fxquant.workflow import evaluate_sets

    def psnr(which: str) -> float:
        scores = evaluate_sets(models.runner(which), models.spec, models.scale, [dataset],
                               data_root=data_root)
        return scores[dataset].psnr

    convs = activation_inputs(models.quant_model)
    fp = psnr("fp")
    # the weight quantizers live inside the layers, the activation ones in front of them
    layers = quantized_layers(models.quant_model)
    weights = {q for layer in layers for q in layer.owned_quantizers}
    activations = {q for layer in layers for q in layer.input_quantizers}
    row = {"model": models.spec.name, "scale": models.scale, "dataset": dataset,
           "fp": round(fp, 4), "quantized_convs": len(convs)}
    with quant_mode(models.quant_model, "off", keep=weights):
        row["weights_only"] = round(psnr("quant") - fp, 4)
    with quant_mode(models.quant_model, "off", keep=activations):
        row["static_activations_only"] = round(psnr("quant") - fp, 4)
    if per_layer:  # one layer's static activations at a time
        row["static_one_layer"] = {}
        for name, (quantizer, _) in convs.items():
            with quant_mode(models.quant_model, "off", keep=[quantizer]):
                row["static_one_layer"][name] = round(psnr("quant") - fp, 4)
    handles = quantize_inputs(models.float_model, {n: b for n, (_, b) in convs.items()})
    try:
        row["per_image_activations_only"] = round(psnr("fp") - fp, 4)
    finally:
        for handle in handles:
            handle.remove()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--per-layer", action="store_true",
                        help="also each layer's static activations alone")
    args = parser.parse_args(argv)
    try:
        models = models_from_source_args(args, [args.dataset])
        row = bound_row(models, args.dataset, args.data, args.per_layer)
    except FxquantError as exc:
        print(f"activation_bound: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
