"""``observe``: put an observer in front of every selected layer's input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.graph import (
    OUTPUT_OBSERVER,
    conv_nodes,
    insert_output_module,
    insert_shared_input_module,
    is_relu,
    module_of,
    pixel_shuffle_factor,
    record_selection,
    select_layers,
)
from fxquant.observers import OBSERVER_KINDS, Observer, make_activation_observer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.recipe import GRANULARITIES, RecipeError


@register_pass
@dataclass(frozen=True)
class ObservePass(Pass):
    """Insert an activation observer on the input of each layer the recipe selects.

    Before::                          After::

        x ──► body_0_conv1               x ──► body_0_conv1_input_observer ──► body_0_conv1
        x ──► body_0_conv2               x ──► body_0_conv2_input_observer ──► body_0_conv2

    One observer per observed tensor: where several selected convs read the same value
    (a residual stream read by two branches), they share one ``<value>_shared_input_observer``,
    so the value is quantized once and a lowered graph can keep it as integers.
    ``observer`` / ``granularity`` override the recipe's activation settings. Observers are
    identities, so outputs are unchanged.

    ``outputs`` (off by default) also observes each selected conv's output, per tensor, where
    it is read by float ops (leaky ReLU, split, concat, adds), as PT2E does::

        c1 ──► c1_output_observer ──► leaky_relu ──► ...

    — one more rounding per conv, in exchange for integer output: the lowered ``cpu`` conv
    then writes uint8 codes and the float ops read a byte per value instead of four. A conv
    read only by input observers (directly or through a ReLU) gets none: those already take
    its uint8 output when lowered; nor does the graph's last conv, whose output is the image.
    """

    name: ClassVar[str] = "observe"
    observer: str | None = None
    granularity: str | None = None
    outputs: bool = False

    def __post_init__(self):
        if self.observer is not None and self.observer not in OBSERVER_KINDS:
            raise RecipeError(f"observer '{self.observer}' unknown; valid: "
                              f"{', '.join(OBSERVER_KINDS)}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise RecipeError(f"granularity '{self.granularity}' unknown; valid: "
                              f"{', '.join(GRANULARITIES)}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        acts = ctx.recipe.activations
        method = self.observer or acts.observer
        per_channel = (self.granularity or acts.granularity) == "per-channel"
        selection = select_layers(gm, ctx.recipe.layers)
        by_value: dict[fx.Node, list[fx.Node]] = {}
        for node in selection.nodes:
            by_value.setdefault(node.args[0], []).append(node)
        for consumers in by_value.values():
            name = consumers[0].name if len(consumers) == 1 else consumers[0].args[0].name
            observer = make_activation_observer(method, name, per_channel, acts.percentile)
            insert_shared_input_module(gm, consumers, observer, "input_observer")
        outputs = 0
        if self.outputs and selection.nodes:
            last = conv_nodes(gm)[-1]  # its output is the image: no extra 8-bit rounding
            for node in selection.nodes:
                if node is not last and not _read_only_by_input_observers(gm, node):
                    observer = make_activation_observer(method, node.name, False, acts.percentile)
                    insert_output_module(gm, node, observer, OUTPUT_OBSERVER[1:])
                    outputs += 1
        gm.recompile()
        record_selection(ctx.state, len(selection.nodes), selection.skipped)
        info = {"observed": len(selection.nodes), "observers": len(by_value),
                "skipped": len(selection.skipped)}
        return PassResult(gm, bool(selection.nodes),
                          {**info, "output_observers": outputs} if self.outputs else info)


def _read_only_by_input_observers(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Every reader of ``node`` (or of the chain of single-reader ReLUs and pixel shuffles
    after it, an upsampler's ``conv → [ReLU] → shuffle``) is an input observer: the lowered
    conv can already emit their uint8 codes (the shuffle then moves behind the quantizer)."""
    users = list(node.users)
    while len(users) == 1 and (is_relu(gm, users[0])
                               or pixel_shuffle_factor(gm, users[0]) is not None):
        users = list(users[0].users)
    return bool(users) and all(isinstance(module_of(gm, u), Observer) for u in users)
