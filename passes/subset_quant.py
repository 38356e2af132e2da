"""``subset-quant``: DFSQ's subset quantizers from the sampled calibration values, and the
``dfsq`` method (options, default pipeline)."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.errors import CalibrationError
from fxquant.graph import replace_module_node
from fxquant.quant.fitting import weight_quantizer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, swap_in_quant_conv
from fxquant.quant.exhaustive_selection import exhaustive_select
from fxquant.quant.point_selection import INITS, kmeans_select
from fxquant.quant.subset import MODES, SampleObserver, SubsetQuantizer
from fxquant.quant.universal_set import universal_set
from fxquant.recipe import RecipeError, check_pass_options, register_method

SELECTIONS = ("kmeans", "exhaustive")


@dataclass
class DFSQOptions:
    """``[options]`` of ``method = "dfsq"``; the defaults are the official code's.

    * ``normalization``: ``dynamic`` (official, per image and channel, at run time) or
      ``static`` (per-channel scale from calibration, foldable into convs);
    * ``selection``: ``kmeans`` (the paper's fast selection) or ``exhaustive`` (every subset;
      only for tiny universal sets, refused above ``exhaustive_limit`` subsets per channel);
    * ``universal_words`` / ``universal_exponents``: the universal set (official: 4 words,
      word i ∈ {1, 2^-i, 2^-(i+4), 0}; ``universal_exponents`` gives each word's exponents e
      of 2^-e explicitly);
    * K-means: ``restarts`` (5), ``kmeans_iters`` (100), ``kmeans_tol`` (1e-3), ``kmeans_init``
      (``k-means++``, ``sklearn``, ``random`` = official), ``pin_zero`` (a centre fixed at 0);
    * ``memory_mb``: budget for the sampled calibration values of all layers together
      (``max_samples`` caps each channel); ``workers``: threads selecting layers in parallel;
    * ``seed``: sampling and K-means seed; ``eps``: the normalization epsilon (1e-8).
    """

    normalization: str = "dynamic"
    selection: str = "kmeans"
    universal_words: int = 4
    universal_exponents: list[list[int]] = field(default_factory=list)
    restarts: int = 5
    kmeans_iters: int = 100
    kmeans_tol: float = 1e-3
    kmeans_init: str = "k-means++"
    pin_zero: bool = True
    memory_mb: float = 256.0
    max_samples: int = 16384
    workers: int = 2
    exhaustive_limit: int = 2_000_000
    range_guard: float = 0.0
    seed: int = 0
    eps: float = 1e-8

    def validate(self, where: str = "options") -> None:
        choices = {"normalization": MODES, "selection": SELECTIONS, "kmeans_init": INITS}
        for name, valid in choices.items():
            if getattr(self, name) not in valid:
                raise RecipeError(f"{where}.{name}: '{getattr(self, name)}' is not valid; "
                                  f"choose one of {', '.join(valid)}")
        for name in ("universal_words", "restarts", "kmeans_iters", "max_samples", "workers",
                     "exhaustive_limit"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} = {getattr(self, name)} must be >= 1")
        if self.range_guard < 0 or 0 < self.range_guard < 1:
            raise RecipeError(f"{where}.range_guard = {self.range_guard}: use 0 (off) or a "
                              "factor >= 1 of the calibration range")
        for name in ("kmeans_tol", "memory_mb", "eps"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{where}.{name} = {getattr(self, name)} must be > 0")
        sizes = [len(e) + 1 for e in self.universal_exponents] or [4] * self.universal_words
        if math.prod(sizes) > 2 ** 20:
            raise RecipeError(f"{where}: a universal set of {self.universal_words} words has "
                              f"{math.prod(sizes):.3g} word combinations; use at most 2^20 "
                              "(e.g. universal_words <= 10 with the official pattern)")
        try:
            u = self.universe()
        except ValueError as exc:
            raise RecipeError(f"{where}.universal_exponents: {exc}") from None
        if self.pin_zero and not bool((u == 0).any()):
            raise RecipeError(f"{where}.pin_zero needs 0 in the universal set")

    def universe(self) -> torch.Tensor:
        return universal_set(self.universal_words, self.universal_exponents or None)


def dfsq_options(ctx: PassContext) -> DFSQOptions:
    """The recipe's DFSQ options, or their defaults under another method."""
    return ctx.recipe.options_for(DFSQOptions)


register_method("dfsq", DFSQOptions,
                "trace,dfsq-observe,calibrate,subset-quant,fold-channel-norm,verify",
                "DFSQ: per-channel normalized activations, per-channel subsets of a universal "
                "set chosen by K-means; per-output-channel min/max weights")


@contextmanager
def single_threaded_torch():
    """Intra-op threads off while selection threads run (one op per thread, no oversubscription)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@register_pass
@dataclass(frozen=True)
class SubsetQuantizePass(Pass):
    """Replace every DFSQ sample observer by a :class:`SubsetQuantizer` and quantize the
    consumer conv's weights (per output channel, asymmetric min/max, as the official code).

    Before::                                         After::

        x ──► c1_input_observer ──► c1 (Conv2d)       x ──► c1_input_quantizer ──► c1 (QuantConv2d)
              (SampleObserver)                              (SubsetQuantizer, C × 2^b points)

    Each channel's 2^b points are chosen from the universal set by K-means (or exhaustive
    search) on the observer's normalized samples; layers are processed by ``workers``
    threads. ``w``/``a`` override the recipe's bit-widths, ``selection`` the recipe option,
    and ``weights=false`` leaves the convs' weights in float.
    """

    name: ClassVar[str] = "subset-quant"
    w: int | None = None
    a: int | None = None
    selection: str | None = None
    weights: bool = True

    def __post_init__(self):
        check_pass_options(self.name, {"w": self.w, "a": self.a},
                           {"selection": (self.selection, SELECTIONS)})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe, options = ctx.recipe, dfsq_options(ctx)
        a_bits = self.a or recipe.activations.bits
        w_bits = self.w or recipe.weights.bits
        selection = self.selection or options.selection
        universe = options.universe()
        if 2 ** a_bits > universe.numel():
            raise RecipeError(f"{2 ** a_bits} points per channel ({a_bits} bits) do not fit in a "
                              f"universal set of {universe.numel()} values")
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), SampleObserver)]
        observers = {n.name: gm.get_submodule(n.target) for n in nodes}
        todo = [n for n in nodes if observers[n.name].has_data]
        missing = [n.target for n in nodes if not observers[n.name].has_data]
        if missing and ctx.calibrate:
            raise CalibrationError(f"observer '{missing[0]}' saw no calibration data: is the "
                                   "layer reached by the forward pass?")

        def select(node: fx.Node):
            samples = observers[node.name].normalized_samples()
            seed = options.seed * 100_003 + nodes.index(node)
            if selection == "kmeans":
                return kmeans_select(samples, universe, 2 ** a_bits, restarts=options.restarts,
                                     iters=options.kmeans_iters, tol=options.kmeans_tol,
                                     init=options.kmeans_init, pin_zero=options.pin_zero,
                                     seed=seed, workers=1)
            try:
                return exhaustive_select(samples, universe, 2 ** a_bits,
                                         pin_zero=options.pin_zero,
                                         limit=options.exhaustive_limit)
            except ValueError as exc:
                raise RecipeError(str(exc)) from None

        started = time.perf_counter()
        with single_threaded_torch(), ThreadPoolExecutor(max_workers=options.workers) as pool:
            results = dict(zip((n.name for n in todo), pool.map(select, todo)))
        select_s = time.perf_counter() - started

        report = {}
        weights = 0
        for node in nodes:
            observer = observers[node.name]
            (consumer,) = node.users
            quantizer = SubsetQuantizer(a_bits, observer.channels, post_relu=observer.post_relu,
                                        mode=observer.mode, eps=observer.eps,
                                        guard=options.range_guard > 0)
            chosen = results.get(node.name)
            if chosen is not None:
                quantizer.set_points(chosen.points)
                if observer.mode == "static":
                    quantizer.set_scale(observer.scale())
                if quantizer.guard:
                    quantizer.set_guard(observer.min_val, observer.max_val, options.range_guard)
                report[consumer.name] = {"post_relu": observer.post_relu,
                                         "mse": float(chosen.mse.mean()),
                                         "samples": chosen.samples,
                                         "collisions": chosen.collisions}
            replace_module_node(gm, node, quantizer, f"{consumer.name}_input_quantizer")
            conv = gm.get_submodule(consumer.target)
            if self.weights and isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantConv2d):
                swap_in_quant_conv(gm, consumer.target, weight_quantizer(conv, recipe.weights, w_bits))
                weights += 1
        gm.recompile()
        ctx.state["subset-quant"] = report
        mses = [r["mse"] for r in report.values()]
        return PassResult(gm, bool(nodes), {
            "activation_quantizers": len(nodes), "weight_quantizers": weights,
            "selection": selection, "select_s": round(select_s, 2),
            "mean_mse": round(sum(mses) / len(mses), 8) if mses else None,
            "collisions": sum(r["collisions"] for r in report.values())})
