"""``nonuniform-quant``: I²NQ's non-uniform activation quantizers from sampled calibration
values, and the ``i2nq`` method (options, default pipeline). docs/methods/i2nq.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import fx, nn

from fxquant.errors import CalibrationError
from fxquant.graph import (input_bits, nothing_selected, produces_nonnegative,
                           replace_module_node, select_layers)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, swap_in_quant_conv
from fxquant.quant.fitting import weight_quantizer
from fxquant.quant.nonuniform import LEVEL_METHODS, NonUniformQuantizer, fit_levels
from fxquant.quant.subset import SampleObserver
from fxquant.recipe import RecipeError, check_pass_options, register_method

PIN_ZERO = ("relu", "always", "never")
FSWA_MODES = ("adjust", "scale", "off")


@dataclass
class I2NQOptions:
    """``[options]`` of ``method = "i2nq"`` (fxquant's reading of the abstract; see
    docs/methods/i2nq.md).

    * ``levels``: ``lloyd-max`` (quantile init refined by Lloyd-Max), ``quantile``, or
      ``uniform`` (equally spaced, MSE-best range: the ablation with everything else equal);
      per layer or per channel after ``activations.granularity``;
    * ``iters`` / ``tol``: Lloyd-Max refinement steps and stopping tolerance (· range);
    * ``pin_zero``: a level fixed at exactly 0 for inputs the graph proves non-negative
      (``relu``), for every input (``always``) or never;
    * ``integer_grid``: snap each layer's levels onto one uint8 grid (8: the int8 CPU path
      can run it) or keep float levels (0: fake-quant only);
    * ``learnable``: the levels and the weights' (flex) scales as trainable Parameters
      (for reconstruction or QAT; PTQ itself does not train them);
    * ``fswa``: flex scale + weight adjust (``adjust``), flex scale only (``scale``) or
      ``off``; ``fswa_ratios`` clipping ratios from 1 to ``fswa_min_ratio``; ``fswa_damp``
      the Gram diagonal damping; ``fswa_batches`` calibration batches per layer.
    """

    levels: str = "lloyd-max"
    iters: int = 100
    tol: float = 1e-5
    pin_zero: str = "relu"
    integer_grid: int = 8
    learnable: bool = False
    fswa: str = "adjust"
    fswa_ratios: int = 40
    fswa_min_ratio: float = 0.3
    fswa_damp: float = 0.01
    fswa_batches: int = 4

    def validate(self, where: str = "options") -> None:
        for name, valid in (("levels", LEVEL_METHODS), ("pin_zero", PIN_ZERO), ("fswa", FSWA_MODES)):
            if getattr(self, name) not in valid:
                raise RecipeError(f"{where}.{name}: '{getattr(self, name)}' is not valid; "
                                  f"choose one of {', '.join(valid)}")
        if self.integer_grid not in (0, 8):
            raise RecipeError(f"{where}.integer_grid = {self.integer_grid}: use 8 (levels on "
                              "a uint8 grid, lowerable) or 0 (float levels)")
        for name in ("iters", "fswa_ratios", "fswa_batches"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} = {getattr(self, name)} must be >= 1")
        if not 0 < self.fswa_min_ratio <= 1:
            raise RecipeError(f"{where}.fswa_min_ratio = {self.fswa_min_ratio} must lie in (0, 1]")
        for name in ("tol", "fswa_damp"):
            if not getattr(self, name) > 0:
                raise RecipeError(f"{where}.{name} = {getattr(self, name)} must be > 0")


def i2nq_options(ctx: PassContext) -> I2NQOptions:
    """The recipe's I2NQ options, or their defaults under another method."""
    return ctx.recipe.options_for(I2NQOptions)


register_method("i2nq", I2NQOptions,
                "trace,observe{observer=samples},calibrate,nonuniform-quant,fswa,verify",
                "I²NQ (interpretation): per-layer/channel non-uniform activation levels "
                "(Lloyd-Max), flex-scale weight adjustment")


@register_pass
@dataclass(frozen=True)
class NonUniformQuantizePass(Pass):
    """Replace every sample observer by a :class:`NonUniformQuantizer` fitted to its samples
    and quantize the consumer convs' weights (the recipe's uniform weight quantizer).

    Before::                                        After::

        x ──► c1_input_observer ──► c1 (Conv2d)      x ──► c1_input_quantizer ──► c1 (QuantConv2d)
              (SampleObserver)                             (NonUniformQuantizer, rows × 2^b levels)

    Rows are the tensor (per-tensor) or its channels (per-channel), after the recipe's
    ``activations.granularity``. ``w``/``a`` override the recipe's bit-widths, ``levels`` the
    recipe option; ``layers.first_last_bits`` and ``layers.tail_bits`` give those convs their
    own width (``2^bits`` levels, on the same grid).
    """

    name: ClassVar[str] = "nonuniform-quant"
    w: int | None = None
    a: int | None = None
    levels: str | None = None

    def __post_init__(self):
        check_pass_options(self.name, {"w": self.w, "a": self.a},
                           {"levels": (self.levels, LEVEL_METHODS)})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        recipe, options = ctx.recipe, i2nq_options(ctx)
        a_bits = self.a or recipe.activations.bits
        w_bits = self.w or recipe.weights.bits
        layer_bits = select_layers(gm, recipe.layers).bits  # first_last_bits, tail_bits
        widest = max([a_bits, *layer_bits.values()])
        if options.integer_grid and widest > options.integer_grid:
            raise RecipeError(f"{2 ** widest} levels ({widest} bits) do not fit on a "
                              f"{options.integer_grid}-bit grid; use at most "
                              f"{options.integer_grid} bits (activations.bits, "
                              "layers.first_last_bits, layers.tail_bits) or "
                              "options.integer_grid = 0")
        per_channel = recipe.activations.granularity == "per-channel"
        nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                 and isinstance(gm.get_submodule(n.target), SampleObserver)]
        if not nodes and nothing_selected(ctx.state):
            # the layer rules left every layer out: nothing to do here, and compile names
            # the rules (or returns the float result under allow_unquantized)
            return PassResult(gm, False, {"activation_quantizers": 0})
        if not nodes:
            raise RecipeError("nonuniform-quant found no sample observers; put "
                              "'observe{observer=samples},calibrate' before it")
        report, weights, moved = {}, 0, 0.0
        for node in nodes:
            observer = gm.get_submodule(node.target)
            consumers = list(node.users)
            convs = [gm.get_submodule(c.target) for c in consumers]
            channels = convs[0].in_channels
            bits = input_bits(layer_bits, consumers, a_bits)
            quantizer = NonUniformQuantizer(bits, channels if per_channel else None,
                                            learnable=options.learnable)
            if observer.has_data:
                moved = max(moved, self._fit(gm, node, observer, quantizer, options))
                report[str(node.target)] = float(quantizer.levels.detach().diff(dim=1).amax())
            elif ctx.calibrate:
                raise CalibrationError(f"observer '{node.target}' saw no calibration data: "
                                       "is the layer reached by the forward pass?")
            name = str(node.target).replace("_input_observer", "_input_quantizer")
            replace_module_node(gm, node, quantizer, name)
            for consumer, conv in zip(consumers, convs):
                if isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantConv2d):
                    swap_in_quant_conv(gm, consumer.target, weight_quantizer(
                        conv, recipe.weights, layer_bits.get(consumer.name, w_bits),
                        learnable=options.learnable))
                    weights += 1
        gm.recompile()
        ctx.state["nonuniform-quant"] = report
        info = {"activation_quantizers": len(nodes), "weight_quantizers": weights,
                "levels": self.levels or options.levels,
                "granularity": recipe.activations.granularity,
                "grid": f"u{options.integer_grid}" if options.integer_grid else "float",
                "max_grid_move_steps": round(moved, 3)}
        if recipe.layers.first_last_bits or recipe.layers.tail_bits:
            info["layer_bits"] = dict(layer_bits)  # {} says the model had no such layers
        return PassResult(gm, True, info)

    def _fit(self, gm: fx.GraphModule, node: fx.Node, observer: SampleObserver,
             quantizer: NonUniformQuantizer, options: I2NQOptions) -> float:
        samples = observer.values  # C × s raw values
        if quantizer.channels is None:
            samples = samples.reshape(1, -1)
        source = node.args[0]
        nonnegative = isinstance(source, fx.Node) and produces_nonnegative(gm, source)
        pin = options.pin_zero == "always" or (options.pin_zero == "relu" and nonnegative)
        levels = fit_levels(samples, 2 ** quantizer.bits, method=self.levels or options.levels,
                            iters=options.iters, tol=options.tol, pin_zero=pin)
        quantizer.set_levels(levels)
        return quantizer.snap_to_grid(options.integer_grid) if options.integer_grid else 0.0

