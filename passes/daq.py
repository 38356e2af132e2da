"""``daq`` and ``daq-sensitivity``: DAQ (Hong et al., WACV 2022) graph surgery, and the
``daq`` method that recipes select with ``method = "daq"``.

The quantizer math lives in :mod:`fxquant.quant.daq`; these passes only insert modules.
The method's default pipeline is ``trace,daq-sensitivity,calibrate,daq,verify``: for plain
DAQ ``daq-sensitivity`` inserts nothing, so ``calibrate`` is skipped (DAQ needs no data);
with ``mixed_precision = true`` it inserts sensitivity observers, ``calibrate`` feeds them
and ``daq`` allocates per-channel bits from what they measured. See ``docs/methods/daq.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.calibration import as_batches
from fxquant.errors import CalibrationError, RecipeError
from fxquant.graph import (insert_input_module, produces_nonnegative, record_selection,
                           refuse_bit_overrides, replace_module_node, select_layers)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, swap_in_quant_conv
from fxquant.quant.daq import DAQ_BITS, STEP_INDICES, WEIGHT_GRANULARITIES, DAQActivationQuantizer
from fxquant.quant.daq_weights import DAQWeightQuantizer
from fxquant.quant.daq_bit_allocation import allocate_network_bits
from fxquant.quant.daq_mixed import DAQSensitivityObserver, downstream_gains
from fxquant.recipe import register_method

POST_RELU = {"unclipped": "relu", "clipped": "relu-clipped", "initial": "relu-initial",
             "off": "signed"}
MP_SCOPES = ("network", "layer")
MP_WEIGHTS = ("match", "fixed")
MP_SENSITIVITIES = ("output", "input")
MP_WEIGHTINGS = ("downstream-dc", "downstream", "none")
MP_BUDGETS = ("mac", "channel")


def _choice(value, choices, where: str) -> None:
    if value not in choices:
        raise RecipeError(f"{where}: '{value}' is not valid; choose one of "
                          f"{', '.join(map(str, choices))}")


def _daq_bits(bits: int, where: str) -> None:
    if bits not in DAQ_BITS:
        raise RecipeError(f"{where} = {bits} is not supported by DAQ's step table; use "
                          f"{DAQ_BITS[0]}..{DAQ_BITS[-1]}")


@dataclass
class DAQOptions:
    """``[options]`` of ``method = "daq"``. Defaults reproduce the official code (HEAD).

    * ``post_relu``: the branch for inputs the graph proves non-negative: ``unclipped``
      (HEAD: ``Δ·round(x/Δ)``, no upper bound), ``clipped`` (levels ``0..(2^b − 1)·Δ``),
      ``initial`` (initial commit 45aa157: μ-centred, clipped), or ``off`` (signed branch).
    * ``step_index`` / ``weight_step_index``: ``head`` looks up ``gaussian_steps[b − 1]``,
      ``initial`` ``gaussian_steps[b]`` (activations and σ / weights).
    * ``qq_bits``: quantize σ per image across channels with this many bits (0 = off).
    * ``weight_granularity``: σ_w per tensor (official) or per output channel. The recipe's
      ``[weights].bits`` / ``[activations].bits`` are used; their observer/granularity keys
      do not apply to DAQ.
    * ``mixed_precision``: per-(layer, input channel) bits from ``mp_bits`` with mean
      ``mp_avg_bits`` (not in the official code; docs/methods/daq.md §5). Sensitivity
      (``mp_sensitivity``): the conv ``output`` error when one input channel is quantized, or
      the ``input`` activation error alone; ``mp_weighting``: ``downstream`` weights each
      output channel's error by its gain to the network output (``downstream-dc`` with a
      separate gain for the DC part, ``none``: plain layer-output error); ``mp_scope``: one
      budget over the ``network`` (``mp_budget``: per ``mac`` or per ``channel``) or exactly
      ``mp_avg_bits`` in every ``layer``; ``mp_weights = "match"`` gives each input channel's
      weight slice the channel's bits, ``fixed`` keeps weights at ``[weights].bits``;
      ``mp_probes`` random probes per batch for the gains; ``mp_max_positions`` output
      positions sampled per batch for the error Gram matrices.
    """

    post_relu: str = "unclipped"
    step_index: str = "head"
    weight_step_index: str = "head"
    qq_bits: int = 0
    weight_granularity: str = "per-tensor"
    mixed_precision: bool = False
    mp_bits: list[int] = field(default_factory=lambda: [2, 3, 4])
    mp_avg_bits: float = 3.0
    mp_scope: str = "network"
    mp_weights: str = "match"
    mp_sensitivity: str = "output"
    mp_weighting: str = "downstream"
    mp_budget: str = "mac"
    mp_probes: int = 2
    mp_max_positions: int = 4096

    def validate(self, where: str = "options") -> None:
        _choice(self.post_relu, tuple(POST_RELU), f"{where}.post_relu")
        _choice(self.step_index, STEP_INDICES, f"{where}.step_index")
        _choice(self.weight_step_index, STEP_INDICES, f"{where}.weight_step_index")
        if self.qq_bits:
            _daq_bits(self.qq_bits, f"{where}.qq_bits (0 = off)")
        _choice(self.weight_granularity, WEIGHT_GRANULARITIES, f"{where}.weight_granularity")
        _choice(self.mp_scope, MP_SCOPES, f"{where}.mp_scope")
        _choice(self.mp_weights, MP_WEIGHTS, f"{where}.mp_weights")
        _choice(self.mp_sensitivity, MP_SENSITIVITIES, f"{where}.mp_sensitivity")
        _choice(self.mp_weighting, MP_WEIGHTINGS, f"{where}.mp_weighting")
        _choice(self.mp_budget, MP_BUDGETS, f"{where}.mp_budget")
        if self.mp_probes < 1:
            raise RecipeError(f"{where}.mp_probes must be >= 1")
        if not 1 <= len(self.mp_bits) <= 3 or sorted(set(self.mp_bits)) != list(self.mp_bits):
            raise RecipeError(f"{where}.mp_bits = {self.mp_bits}: give 1 to 3 distinct bit-widths "
                              "in ascending order, e.g. [2, 3, 4]")
        for bits in self.mp_bits:
            _daq_bits(bits, f"{where}.mp_bits")
        if not self.mp_bits[0] <= self.mp_avg_bits <= self.mp_bits[-1]:
            raise RecipeError(f"{where}.mp_avg_bits = {self.mp_avg_bits} must lie in "
                              f"[{self.mp_bits[0]}, {self.mp_bits[-1]}] (the range of mp_bits)")
        if self.mp_max_positions < 1:
            raise RecipeError(f"{where}.mp_max_positions must be >= 1")


register_method("daq", DAQOptions, "trace,daq-sensitivity,calibrate,daq,verify",
                "DAQ: dynamic per-(image, channel) σ-scaled mid-rise activations, σ-scaled "
                "weights; optional channel-sensitivity mixed precision")


def _options(ctx: PassContext) -> DAQOptions:
    """The recipe's DAQ options, or their defaults under another method."""
    return ctx.recipe.options_for(DAQOptions)


def _branch(gm: fx.GraphModule, source, options: DAQOptions) -> str:
    """Post-ReLU branch when the graph proves the input non-negative, else signed."""
    if options.post_relu != "off" and isinstance(source, fx.Node) and produces_nonnegative(gm, source):
        return POST_RELU[options.post_relu]
    return "signed"


def _selected_convs(gm: fx.GraphModule, ctx: PassContext):
    """The recipe's selected layers that DAQ can quantize (Conv2d), and the others skipped."""
    selection = select_layers(gm, ctx.recipe.layers)
    refuse_bit_overrides(selection, "DAQ")
    skipped = dict(selection.skipped)
    nodes = []
    for node in selection.nodes:
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            nodes.append(node)
        else:
            skipped[node.name] = f"DAQ quantizes Conv2d only, not {type(module).__name__}"
    return nodes, skipped


@register_pass
@dataclass(frozen=True)
class DAQSensitivityPass(Pass):
    """Insert a channel-sensitivity observer on each selected conv input (mixed precision).

    Before::                          After (``options.mixed_precision``)::

        h ──► blocks_0_0                  h ──► blocks_0_0_daq_sensitivity ──► blocks_0_0

    Each observer measures, on the calibration batches, the conv's output error when a
    single input channel is DAQ-quantized at each of ``mp_bits`` (weights of that channel
    too with ``mp_weights = "match"``). Identity modules: outputs are unchanged. Without
    ``mixed_precision`` the pass does nothing (and ``calibrate`` is then skipped).
    """

    name: ClassVar[str] = "daq-sensitivity"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options = _options(ctx)
        if not options.mixed_precision:
            return PassResult(gm, False, {"observed": 0})
        nodes, skipped = _selected_convs(gm, ctx)
        w_bits = ctx.recipe.weights.bits
        gains = {}
        if (options.mp_weighting != "none" and options.mp_sensitivity == "output"
                and ctx.calibrate and nodes):
            batches = as_batches(ctx.calib, ctx.recipe.calibration.batch_size)
            gains = downstream_gains(gm, nodes, batches, probes=options.mp_probes)
        for node in nodes:
            conv = gm.get_submodule(node.target)
            observer = DAQSensitivityObserver(
                node.name, conv, options.mp_bits, branch=_branch(gm, node.args[0], options),
                qq_bits=options.qq_bits, step_index=options.step_index,
                weight_mode=options.mp_weights, weight_bits=w_bits,
                weight_granularity=options.weight_granularity,
                weight_step_index=options.weight_step_index, measure=options.mp_sensitivity,
                output_gains=gains[node.name][0] if node.name in gains else None,
                dc_gains=gains[node.name][1] if node.name in gains and
                options.mp_weighting == "downstream-dc" else None,
                max_positions=options.mp_max_positions)
            insert_input_module(gm, node, observer, "daq_sensitivity")
        gm.recompile()
        record_selection(ctx.state, len(nodes), skipped)
        return PassResult(gm, bool(nodes), {"observed": len(nodes), "skipped": len(skipped)})


@register_pass
@dataclass(frozen=True)
class DAQPass(Pass):
    """DAQ fake-quantization of every selected conv: a dynamic activation quantizer on its
    input and a σ-scaled weight quantizer on its weight.

    Before::                              After::

        h ──► blocks_0_0 (Conv2d)             h ──► blocks_0_0_input_quantizer ──► blocks_0_0 (QuantConv2d)
        relu ──► blocks_0_2 (Conv2d)          relu ──► blocks_0_2_input_quantizer ──► blocks_0_2 (QuantConv2d)

    ``blocks_0_0_input_quantizer`` is a :class:`DAQActivationQuantizer` (per-(image, channel)
    μ/σ at run time; signed branch), ``blocks_0_2_input_quantizer`` takes the post-ReLU
    branch because :func:`produces_nonnegative` proves its input ≥ 0. A conv called at
    several places (CARN-M's shared blocks) gets one quantizer per call and one weight
    quantizer. If ``daq-sensitivity`` observers sit on the inputs, per-channel bits are
    allocated from their measurements and the observers are replaced by the quantizers.
    ``w``/``a`` override the recipe's bit-widths (uniform-bit DAQ).
    """

    name: ClassVar[str] = "daq"
    w: int | None = None
    a: int | None = None

    def __post_init__(self):
        for key in ("w", "a"):
            bits = getattr(self, key)
            if bits is not None:
                _daq_bits(bits, f"daq.{key}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options = _options(ctx)
        a_bits = self.a or ctx.recipe.activations.bits
        w_bits = self.w or ctx.recipe.weights.bits
        _daq_bits(a_bits, "activations.bits")
        _daq_bits(w_bits, "weights.bits")
        nodes, skipped = _selected_convs(gm, ctx)
        sites = []  # (conv node, observer node or None, source node)
        for node in nodes:
            arg = node.args[0]
            observer = None
            if isinstance(arg, fx.Node) and arg.op == "call_module" and isinstance(
                    gm.get_submodule(arg.target), DAQSensitivityObserver):
                observer, arg = arg, arg.args[0]
            sites.append((node, observer, arg))
        channel_bits = self._allocate(gm, ctx, options, sites)
        macs = {}  # per conv: MACs per input channel per calibration image, summed over calls
        for node, observer_node, _ in sites:
            if observer_node is not None:
                observer = gm.get_submodule(observer_node.target)
                macs[node.target] = macs.get(node.target, 0) + observer.macs_per_channel
        activations = weights = post_relu = 0
        for node, observer_node, source in sites:
            conv = gm.get_submodule(node.target)
            bits = channel_bits.get(node.target, a_bits)
            branch = _branch(gm, source, options)
            quantizer = DAQActivationQuantizer(conv.in_channels, bits, branch=branch,
                                               qq_bits=options.qq_bits,
                                               step_index=options.step_index)
            if observer_node is not None:
                replace_module_node(gm, observer_node, quantizer, f"{node.name}_input_quantizer")
            else:
                insert_input_module(gm, node, quantizer, "input_quantizer")
            activations += 1
            post_relu += branch != "signed"
            if not isinstance(conv, QuantConv2d):
                match = node.target in channel_bits and options.mp_weights == "match"
                weight_quantizer = DAQWeightQuantizer(
                    conv.weight.shape, channel_bits[node.target] if match else w_bits,
                    granularity=options.weight_granularity,
                    step_index=options.weight_step_index, groups=conv.groups)
                swap_in_quant_conv(gm, node.target, weight_quantizer)
                weights += 1
        gm.recompile()
        record_selection(ctx.state, len(nodes), skipped)
        ctx.state["daq_bits"] = {k: v.tolist() for k, v in channel_bits.items()}
        info = {"activation_quantizers": activations, "weight_quantizers": weights,
                "post_relu": post_relu, "skipped": len(skipped)}
        if channel_bits:
            allocated = torch.cat(list(channel_bits.values())).double()
            info.update({"mixed_precision_layers": len(channel_bits),
                         "avg_bits": round(float(allocated.mean()), 4)})
            if sum(macs.values()) > 0:  # bits averaged over MACs (BitOPs / MACs)
                weighted = sum(float(channel_bits[t].double().sum()) * m for t, m in macs.items())
                total = sum(channel_bits[t].numel() * m for t, m in macs.items())
                info["avg_bits_per_mac"] = round(weighted / total, 4)
        return PassResult(gm, bool(activations), info)

    @staticmethod
    def _allocate(gm: fx.GraphModule, ctx: PassContext, options: DAQOptions,
                  sites) -> dict[str, torch.Tensor]:
        """Per-conv (summed over its call sites) per-input-channel bits from the observers."""
        per_conv: dict[str, list[DAQSensitivityObserver]] = {}
        for node, observer_node, _ in sites:
            if observer_node is not None:
                per_conv.setdefault(node.target, []).append(gm.get_submodule(observer_node.target))
        if not per_conv:
            return {}
        choices = list(options.mp_bits)
        if not all(o.has_data for group in per_conv.values() for o in group):
            if ctx.calibrate:
                missing = [o.node_name for group in per_conv.values() for o in group if not o.has_data]
                raise CalibrationError(f"DAQ sensitivity observers saw no calibration data at "
                                       f"{', '.join(missing[:5])}: is the layer reached by the "
                                       "forward pass?")
            # Rebuilding a saved model: structure only, load_state_dict restores the bits.
            middle = choices[len(choices) // 2]
            return {t: torch.full((gm.get_submodule(t).in_channels,), middle, dtype=torch.int64)
                    for t in per_conv}
        weighted = options.mp_weighting != "none" and options.mp_sensitivity == "output"
        return allocate_network_bits(per_conv, choices, options.mp_avg_bits,
                                     scope=options.mp_scope, weighted=weighted,
                                     budget=options.mp_budget)
