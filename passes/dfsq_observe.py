"""``dfsq-observe``: sample each selected layer's normalized input for DFSQ point selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx

from fxquant.graph import (insert_input_module, produces_nonnegative, record_selection,
                           refuse_bit_overrides, select_layers)
from fxquant.passes.subset_quant import dfsq_options
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant.subset import MODES, SampleObserver
from fxquant.recipe import RecipeError

BYTES_PER_SAMPLE = 4  # float32 value per channel (the shared random key is negligible)


@register_pass
@dataclass(frozen=True)
class DFSQObservePass(Pass):
    """Insert a :class:`SampleObserver` on the input of each layer the recipe selects.

    Before::                          After::

        h ──► body_0_conv1               h ──► body_0_conv1_input_observer ──► body_0_conv1
        r ──► body_0_conv2  (r=relu(.))  r ──► body_0_conv2_input_observer ──► body_0_conv2
                                                (post_relu=True: no mean shift)

    Whether an input is post-ReLU (non-negative) is read from the graph
    (:func:`fxquant.graph.produces_nonnegative`), not set by hand. Each observer keeps a
    uniform sample of at most ``min(max_samples, memory_mb / (4 bytes · Σ channels))``
    positions per channel, so all observers together stay within ``memory_mb``.
    ``normalization`` and ``memory_mb`` override the recipe options. Observers are
    identities, so outputs are unchanged.
    """

    name: ClassVar[str] = "dfsq-observe"
    normalization: str | None = None
    memory_mb: float | None = None

    def __post_init__(self):
        if self.normalization is not None and self.normalization not in MODES:
            raise RecipeError(f"dfsq-observe.normalization '{self.normalization}' unknown; "
                              f"choose one of {', '.join(MODES)}")
        if self.memory_mb is not None and not self.memory_mb > 0:
            raise RecipeError(f"dfsq-observe.memory_mb = {self.memory_mb} must be > 0")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options = dfsq_options(ctx)
        mode = self.normalization or options.normalization
        budget = (self.memory_mb or options.memory_mb) * 2 ** 20
        selection = select_layers(gm, ctx.recipe.layers)
        refuse_bit_overrides(selection, "DFSQ")
        channels = {n.name: gm.get_submodule(n.target).in_channels for n in selection.nodes}
        total = max(1, sum(channels.values()))
        per_channel = int(min(options.max_samples, budget // (BYTES_PER_SAMPLE * total)))
        post_relu = 0
        for index, node in enumerate(selection.nodes):
            source = node.args[0]
            nonneg = isinstance(source, fx.Node) and produces_nonnegative(gm, source)
            post_relu += nonneg
            observer = SampleObserver(node.name, channels[node.name], post_relu=nonneg, mode=mode,
                                      max_samples=per_channel,
                                      seed=options.seed * 100_003 + index, eps=options.eps)
            insert_input_module(gm, node, observer, "input_observer")
        gm.recompile()
        record_selection(ctx.state, len(selection.nodes), selection.skipped)
        return PassResult(gm, bool(selection.nodes), {
            "observed": len(selection.nodes), "post_relu": post_relu,
            "skipped": len(selection.skipped), "normalization": mode,
            "samples_per_channel": per_channel})
