"""``observe``: put an observer in front of every selected layer's input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.graph import insert_shared_input_module, select_layers
from fxquant.observers import OBSERVER_KINDS, make_activation_observer
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
    """

    name: ClassVar[str] = "observe"
    observer: str | None = None
    granularity: str | None = None

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
        gm.recompile()
        ctx.state["skipped_layers"] = selection.skipped
        return PassResult(gm, bool(selection.nodes),
                          {"observed": len(selection.nodes), "observers": len(by_value),
                           "skipped": len(selection.skipped)})
