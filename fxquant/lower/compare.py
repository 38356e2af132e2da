"""How closely a lowered model follows its fake-quant model, layer by layer.

Each integer conv is run on exactly the input its fake-quant conv saw (the de-quantized
values ``(q − z)·s``, which give back the codes ``q``), and the two outputs are compared in
units of the conv's output step ``s_x·s_w[o]`` (one unit of the int32 accumulator). The
integer conv accumulates exactly; the fake-quant conv accumulates de-quantized values in
float32, so the two differ by float32 accumulation error, a small fraction of a step.

Whole models are compared by PSNR, not element by element: a float32 difference that moves
a value across a rounding boundary of the next quantizer changes that code by one, and
through tens of quantized layers (IMDN: 40) such flips spread, so two equally valid integer
executions of the same quantized network drift apart element-wise while scoring the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxquant.graph import method_owner
from fxquant.lower.conv import IntegerConv2d
from fxquant.lower.folded import DaqConv2d
from fxquant.lower.planes import code_values


@dataclass(frozen=True)
class LayerAgreement:
    layer: str
    max_steps: float  # largest |y_lowered − y_fake| / (s_x·s_w[o])


def run_hooked(model: torch.nn.Module, hooks: list, inputs: list[torch.Tensor]) -> None:
    """Run ``inputs`` through ``model`` without gradients with forward hooks
    ``(module, hook)`` registered, and removed afterwards whatever happens."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for handle in handles:
            handle.remove()


def in_layer_order(layer, out: torch.Tensor) -> torch.Tensor:
    """A fake-quant conv's output in its lowered layer's channel order (permuted where the
    lower pass made it phase-major for the pixel shuffle after it)."""
    return out if layer.output_order is None else out[:, layer.output_order]


def layer_agreement(fake: fx.GraphModule, lowered: fx.GraphModule,
                    inputs: list[torch.Tensor]) -> list[LayerAgreement]:
    """Per integer conv of ``lowered``: the largest output difference against its
    fake-quant conv on the same input, in output steps, over ``inputs`` run through ``fake``
    (a conv that emits uint8 codes: against the codes of the fake-quant output, in steps of
    the quantizer it took over, where a tie rounded the other way is one step)."""
    # graph order = call order: a conv module the model calls k times (CARN-M's shared
    # blocks) has k lowered layers, the i-th for its i-th call
    modules = dict(lowered.named_modules())
    layers = {n.target: modules[n.target] for n in lowered.graph.nodes
              if n.op == "call_module" and isinstance(modules[n.target], IntegerConv2d)}
    by_source: dict[str, list[str]] = {}
    for name, layer in layers.items():
        by_source.setdefault(layer.source, []).append(name)
    worst = {name: 0.0 for name in layers}
    calls = {source: 0 for source in by_source}
    hooks = []
    for source, names in by_source.items():
        def compare(_m, args, out, source=source, names=names):
            name = names[calls[source] % len(names)]
            calls[source] += 1
            layer = layers[name]
            y = layer(layer.codes_of(args[0]))
            out = in_layer_order(layer, out)
            if float(getattr(layer, "output_scale", 0)) > 0:  # fused: uint8 codes out
                diff = (y.float() - _output_codes(layer, out)).abs()  # in output steps
            else:
                step = (layer.input_scale * layer.weight_scale).view(1, -1, 1, 1)
                diff = (y - out).abs() / step
            worst[name] = max(worst[name], float(diff.max()))

        hooks.append((fake.get_submodule(source), compare))
    run_hooked(fake, hooks, inputs)
    return [LayerAgreement(name, worst[name]) for name in layers]


def _output_codes(layer, out: torch.Tensor) -> torch.Tensor:
    """The codes a fused conv should emit for fake-quant output ``out``: its ReLU, then its
    output quantizer's rounding."""
    y = out.relu() if bool(layer.output_relu) else out
    return torch.clamp(torch.round(y / layer.output_scale) + layer.output_zero_point, 0,
                       int(layer.output_qmax))


def daq_layer_agreement(fake: fx.GraphModule, lowered: fx.GraphModule,
                        inputs: list[torch.Tensor]) -> list[tuple[str, float, int]]:
    """Per lowered DAQ conv: ``(name, max |y_lowered − y_fake| / max |y_fake|, max code)``,
    each lowered codes+conv pair run on the raw input its fake-quant quantizer saw."""
    modules = dict(lowered.named_modules())
    pairs = {}  # fake quantizer name -> (lowered conv name, codes module, conv module)
    for n in lowered.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], DaqConv2d):
            # the codes module, or the one whose join_codes the conv reads (hoisted pieces)
            codes = method_owner(lowered, n.args[0])
            if codes is None:
                codes = modules[n.args[0].target]
            pairs[codes.source] = (n.target, codes, modules[n.target])
    worst = {name: 0.0 for name, _, _ in pairs.values()}
    top = {name: 0 for name, _, _ in pairs.values()}
    seen = {"x": None, "q": None}

    def grab(name):
        def hook(_m, args, _out):
            seen["x"], seen["q"] = args[0], name
        return hook

    def compare(_m, _args, out):
        if seen["q"] not in pairs:
            return
        name, codes, layer = pairs[seen["q"]]
        packed = codes(seen["x"])
        top[name] = max(top[name], int(code_values(packed[0]).max()))
        out = in_layer_order(layer, out)
        diff = float((layer(packed) - out).abs().max()) / max(float(out.abs().max()), 1e-30)
        worst[name] = max(worst[name], diff)
        seen["q"] = None

    sources = {layer.source for _, _, layer in pairs.values()}
    hooks = [(fake.get_submodule(qname), grab(qname)) for qname in pairs]
    hooks += [(fake.get_submodule(source), compare) for source in sources]
    run_hooked(fake, hooks, inputs)
    return [(name, worst[name], top[name]) for name in worst]
