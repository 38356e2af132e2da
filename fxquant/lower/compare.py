"""How closely a lowered model follows its fake-quant model: the integer codes each integer
conv computes from its input against the codes the fake-quantizer gave the same conv.

Float rounding differs between the two (integer accumulation then one rescale, against a
float conv of de-quantized values), so a value that lands within an ulp of a rounding
boundary can round the other way, and the difference travels on. The contract is that
codes agree within one step everywhere; this measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxquant.lower.conv import IntegerConv2d


@dataclass(frozen=True)
class CodeAgreement:
    layer: str
    max_step_difference: int
    fraction_different: float


def code_agreement(fake: fx.GraphModule, lowered: fx.GraphModule,
                   inputs: list[torch.Tensor]) -> list[CodeAgreement]:
    """Per integer conv of ``lowered``: the largest |code difference| against ``fake`` and
    the fraction of codes that differ, over ``inputs``."""
    layers = {name: m for name, m in lowered.named_modules() if isinstance(m, IntegerConv2d)}
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, layer in layers.items():
        conv = fake.get_submodule(layer.source)

        def grab_fake(_m, args, key=("fake", name), layer=layer):
            # the conv's input is already de-quantized: (q − z)·s, so q = round(x̂/s) + z
            captured.setdefault(key, []).append(
                torch.round(args[0] / layer.input_scale) + layer.input_zero_point)

        def grab_lowered(_m, args, key=("lowered", name), layer=layer):
            captured.setdefault(key, []).append(layer.quantize_input(args[0]))

        hooks.append(conv.register_forward_pre_hook(grab_fake))
        hooks.append(layer.register_forward_pre_hook(grab_lowered))
    try:
        with torch.no_grad():
            for x in inputs:
                fake(x)
                lowered(x)
    finally:
        for h in hooks:
            h.remove()
    result = []
    for name in layers:
        pairs = zip(captured.get(("fake", name), []), captured.get(("lowered", name), []))
        worst, differ, total = 0, 0, 0
        for a, b in pairs:
            d = (a - b).abs()
            worst = max(worst, int(d.max()))
            differ += int((d > 0).sum())
            total += d.numel()
        result.append(CodeAgreement(name, worst, differ / max(total, 1)))
    return result
