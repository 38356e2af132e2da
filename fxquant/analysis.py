"""Per-layer error attribution: which quantized layers lose accuracy.

:func:`layer_errors` runs the float model and the quantized GraphModule side by side on the
same inputs and reports, for every quantized layer, the SQNR and MSE of its output against
the float layer of the same qualified name, in two modes (in the spirit of torch.ao's Numeric
Suite and AIMET's QuantAnalyzer):

- **propagated** (Numeric Suite's "propagation"): each model runs on its own activations,
  so the error at a layer is the *cumulative* error of everything before it;
- **isolated** ("shadow"): each quantized layer is fed the float model's input of that
  layer, so the error is the layer's *local* error. The isolated error is also split into
  a weight-only part (float input, quantized weights) and an activation-only part
  (quantized input, float weights).

The other question, how far the network output moves with one layer quantized (or all but
one), is :mod:`fxquant.sensitivity`, which shares this module's discovery and scores.

A *quantized layer* is a ``call_module`` node of the quantized GraphModule that owns a
:class:`~fxquant.quant.base.Quantizer` (a ``QuantConv2d``'s ``weight_quantizer``) or whose first
input comes through a chain of Quantizer nodes (``<node>_input_quantizer``). It is matched to the
float model's module of the same qualified name (``IMDB1.c1``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx, nn

from fxquant.inspect import format_quantizer, node_quantizer
from fxquant.quant.base import Quantizer, quant_mode

__all__ = [
    "QuantLayer", "LayerError", "LayerErrorReport", "quantized_layers", "layer_errors",
    "as_batches", "psnr_db", "benchmark_crops", "split_label",
]

ModelFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class QuantLayer:
    """One quantized layer (one call of a module) of a compiled GraphModule.

    ``name`` is the module's qualified name (``IMDB1.c1``), ``node`` its graph node name
    (``IMDB1_c1``), ``input_quantizers`` the qualified names of the Quantizer modules its first
    input passes through (outermost last), ``owned_quantizers`` the Quantizers inside the module
    (``IMDB1.c1.weight_quantizer``). A module called at several places (CARN-M's shared
    blocks) gives one QuantLayer per call: ``call`` counts the calls of the module in graph
    order and ``label`` is ``name@call`` for such modules, else ``name``.
    """

    name: str
    node: str
    module_type: str
    input_quantizers: tuple[str, ...]
    owned_quantizers: tuple[str, ...]
    description: str
    call: int = 0
    label: str = ""

    @property
    def quantizers(self) -> tuple[str, ...]:
        return self.input_quantizers + self.owned_quantizers


def split_label(label: str) -> tuple[str, int | None]:
    """``"b1.body.0@2"`` → ``("b1.body.0", 2)``; ``"IMDB1.c1"`` → ``("IMDB1.c1", None)``."""
    name, sep, call = label.rpartition("@")
    if sep and call.isdigit():
        return name, int(call)
    return label, None


def _is_quantizer_node(gm: fx.GraphModule, node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(node.target), Quantizer))


def quantized_layers(gm: fx.GraphModule) -> list[QuantLayer]:
    """Every quantized layer of ``gm`` in graph (topological, i.e. execution) order."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    seen: dict[str, int] = {}
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or _is_quantizer_node(gm, node):
            continue
        call = seen.get(node.target, 0)
        seen[node.target] = call + 1
        module = gm.get_submodule(node.target)
        owned = tuple(f"{node.target}.{name}" for name, sub in module.named_modules()
                      if name and isinstance(sub, Quantizer))
        chain = []
        source = node.args[0] if node.args else None
        while _is_quantizer_node(gm, source):
            chain.append(str(source.target))
            source = source.args[0] if source.args else None
        if not owned and not chain:
            continue
        described = [format_quantizer(gm.get_submodule(q).describe()) for q in reversed(chain)]
        own_info = node_quantizer(gm, node)
        if own_info is not None:
            described.append(format_quantizer(own_info))
        name = str(node.target)
        label = f"{name}@{call}" if calls[node.target] > 1 else name
        layers.append(QuantLayer(name, node.name, type(module).__name__, tuple(reversed(chain)),
                                 owned, "; ".join(described), call, label))
    return layers


def _select(found: list[QuantLayer], layers: Sequence[str] | None) -> list[QuantLayer]:
    if layers is None:
        return found
    wanted = set(layers)
    return [q for q in found if q.label in wanted or q.name in wanted or q.node in wanted]


# ----------------------------------------------------------------------------- helpers
def as_batches(inputs: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A tensor N×C×H×W is one batch; a list of (possibly differently sized) tensors is many."""
    if isinstance(inputs, torch.Tensor):
        return [inputs if inputs.dim() == 4 else inputs.unsqueeze(0)]
    return [t if t.dim() == 4 else t.unsqueeze(0) for t in inputs]


class _ErrorAccumulator:
    """Sum of signal² and noise² over every batch, so SQNR and MSE pool all inputs."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.count = 0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        reference, test = reference.detach().double(), test.detach().double()
        self.signal += float(reference.pow(2).sum())
        self.noise += float((reference - test).pow(2).sum())
        self.count += reference.numel()

    @property
    def mse(self) -> float:
        return self.noise / self.count if self.count else float("nan")

    @property
    def sqnr(self) -> float:
        if not self.count:
            return float("nan")
        if self.noise == 0.0:
            return float("inf")
        if self.signal == 0.0:
            return float("-inf")
        return 10.0 * math.log10(self.signal / self.noise)


def benchmark_crops(dataset: str, scale: int, *, images: int = 2, crop: int = 48,
                    color: str = "rgb", root=None) -> tuple[list[torch.Tensor], list[str]]:
    """Model inputs for the analyses: centred ``crop``×``crop`` LR crops (0: whole images) of
    the first ``images`` images of a benchmark set, with their names."""
    from fxquant.data import BenchmarkSet, to_tensor, to_y_tensor

    convert = to_y_tensor if color == "y" else to_tensor
    inputs, names = [], []
    for pair in BenchmarkSet(dataset, scale, root=root, limit=images):
        x = convert(pair.lr)
        if crop:
            h, w = x.shape[-2:]
            size = min(crop, h, w)
            top, left = (h - size) // 2, (w - size) // 2
            x = x[..., top:top + size, left:left + size]
        inputs.append(x)
        names.append(pair.name)
    return inputs, names


def psnr_db(reference: torch.Tensor, test: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR of ``test`` against ``reference`` on [0, peak] (both clamped to it)."""
    ref = reference.detach().double().clamp(0, peak)
    out = test.detach().double().clamp(0, peak)
    mse = float((ref - out).pow(2).mean())
    return float("inf") if mse == 0.0 else 10.0 * math.log10(peak * peak / mse)


def _first_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"expected a tensor output, got {type(value).__name__}")


# ----------------------------------------------------------------------------- attribution
@dataclass
class LayerError:
    """Output error of one quantized layer against its float counterpart (dB and MSE)."""

    layer: str
    node: str
    index: int
    module_type: str
    quantizer: str
    sqnr_isolated: float = float("nan")
    mse_isolated: float = float("nan")
    sqnr_weight_only: float = float("nan")
    sqnr_activation_only: float = float("nan")
    sqnr_propagated: float = float("nan")
    mse_propagated: float = float("nan")

    def sqnr(self, mode: str) -> float:
        return {"isolated": self.sqnr_isolated, "propagated": self.sqnr_propagated,
                "weight": self.sqnr_weight_only,
                "activation": self.sqnr_activation_only}[mode]


@dataclass
class LayerErrorReport:
    """The result of :func:`layer_errors`: one :class:`LayerError` per matched layer."""

    layers: list[LayerError]
    modes: tuple[str, ...]
    unmatched: list[str] = field(default_factory=list)
    output_sqnr: float = float("nan")
    output_psnr: float = float("nan")
    transformed: list[str] = field(default_factory=list)

    def ranked(self, mode: str = "isolated") -> list[LayerError]:
        """Layers from worst (lowest SQNR) to best; NaN (mode not run) last."""
        return sorted(self.layers, key=lambda e: (math.isnan(e.sqnr(mode)), e.sqnr(mode),
                                                  e.index))

    def worst(self, k: int = 3, mode: str = "isolated") -> list[str]:
        return [e.layer for e in self.ranked(mode)[:k]]

    def by_layer(self) -> dict[str, LayerError]:
        return {e.layer: e for e in self.layers}

    def sqnr_map(self, mode: str = "isolated", key: str = "layer") -> dict[str, float]:
        """``{layer: SQNR}`` (or ``{node name: SQNR}`` with ``key="node"``, unambiguous for
        shared modules), e.g. to colour a DOT dump."""
        return {getattr(e, key): e.sqnr(mode) for e in self.layers}

    def to_dict(self) -> dict:
        return {"modes": list(self.modes), "output_sqnr": self.output_sqnr,
                "output_psnr": self.output_psnr, "unmatched": list(self.unmatched),
                "transformed": list(self.transformed),
                "layers": [asdict(e) for e in self.layers]}

    def table(self, sort: str | None = None) -> str:
        """A fixed-width text table (graph order, or worst first with ``sort=<mode>``)."""
        rows = self.ranked(sort) if sort else self.layers
        header = ("#", "layer", "isolated dB", "weight dB", "act dB", "propagated dB",
                  "isolated MSE", "propagated MSE")
        lines = [header] + [(str(e.index), e.layer, _f(e.sqnr_isolated), _f(e.sqnr_weight_only),
                             _f(e.sqnr_activation_only), _f(e.sqnr_propagated),
                             _g(e.mse_isolated), _g(e.mse_propagated)) for e in rows]
        widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
        text = "\n".join("  ".join(c.rjust(w) if i != 1 else c.ljust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                         for r in lines)
        summary = f"network output: SQNR {_f(self.output_sqnr)} dB, PSNR vs FP " \
                  f"{_f(self.output_psnr)} dB"
        if self.unmatched:
            summary += f"; unmatched layers: {', '.join(self.unmatched)}"
        if self.transformed:
            summary += (f"\nwarning: a pass changed the weights of {', '.join(self.transformed)} "
                        "(e.g. fold-channel-norm folds scales into them), so their outputs are "
                        "rescaled and their per-layer numbers (and those of the layers they "
                        "feed) do not measure quantization error alone")
        return text + "\n" + summary + "\n"


def _f(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def _g(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3g}"


def layer_errors(float_model: nn.Module, quant_model: fx.GraphModule,
                 inputs: torch.Tensor | Sequence[torch.Tensor], *,
                 modes: Sequence[str] = ("isolated", "propagated"),
                 float_fn: ModelFn | None = None, quant_fn: ModelFn | None = None,
                 layers: Sequence[str] | None = None) -> LayerErrorReport:
    """Per-layer SQNR/MSE of ``quant_model`` against ``float_model`` on ``inputs``.

    ``inputs`` is a batch tensor or a list of batches (images of different sizes).
    ``float_fn``/``quant_fn`` call the models when they need more than ``model(x)`` (CARN-M's
    ``lambda x: model(x, scale)``). ``layers`` restricts the analysis to these qualified names.
    Error statistics pool every element of every batch.
    """
    unknown = set(modes) - {"isolated", "propagated"}
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; valid: isolated, propagated")
    float_fn = float_fn or float_model
    quant_fn = quant_fn or quant_model
    float_modules = dict(float_model.named_modules())
    found = _select(quantized_layers(quant_model), layers)
    matched = [q for q in found if q.name in float_modules]
    unmatched = [q.label for q in found if q.name not in float_modules]
    results = [LayerError(q.label, q.node, i, q.module_type, q.description)
               for i, q in enumerate(matched)]
    by_call = {(q.name, q.call): q.label for q in matched}
    names = list(dict.fromkeys(q.name for q in matched))  # each module once, even if shared
    acc = {key: {q.label: _ErrorAccumulator() for q in matched}
           for key in ("isolated", "weight", "activation", "propagated")}
    out_acc, psnrs = _ErrorAccumulator(), []

    for batch in as_batches(inputs):
        float_in: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        float_out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = [float_modules[n].register_forward_hook(_capture(n, float_in, float_out))
                   for n in names]
        try:
            with torch.no_grad():
                reference = _first_tensor(float_fn(batch))
        finally:
            for h in handles:
                h.remove()

        if "isolated" in modes:
            with torch.no_grad():
                for q in matched:
                    if q.call >= len(float_in[q.name]):
                        continue  # the float model did not call it as often
                    x, ref = float_in[q.name][q.call], float_out[q.name][q.call]
                    quant_layer = quant_model.get_submodule(q.name)
                    qx = x
                    for name in q.input_quantizers:
                        qx = quant_model.get_submodule(name)(qx)
                    acc["isolated"][q.label].add(ref, _first_tensor(quant_layer(qx)))
                    with quant_mode(quant_layer, "off"):
                        acc["activation"][q.label].add(ref, _first_tensor(quant_layer(qx)))
                    if q.owned_quantizers:
                        acc["weight"][q.label].add(ref, _first_tensor(quant_layer(x)))
                    else:
                        acc["weight"][q.label].add(ref, ref)

        handles = []
        prop = acc["propagated"]
        counts = dict.fromkeys(names, 0)
        if "propagated" in modes:
            for n in names:
                def hook(module, args, output, name=n):
                    call = counts[name]
                    counts[name] += 1
                    label = by_call.get((name, call))
                    if label is not None and call < len(float_out[name]):
                        prop[label].add(float_out[name][call], _first_tensor(output))
                handles.append(quant_model.get_submodule(n).register_forward_hook(hook))
        try:
            with torch.no_grad():
                output = _first_tensor(quant_fn(batch))
        finally:
            for h in handles:
                h.remove()
        out_acc.add(reference, output)
        psnrs.append(psnr_db(reference, output))

    for r in results:
        if "isolated" in modes:
            r.sqnr_isolated = acc["isolated"][r.layer].sqnr
            r.mse_isolated = acc["isolated"][r.layer].mse
            r.sqnr_weight_only = acc["weight"][r.layer].sqnr
            r.sqnr_activation_only = acc["activation"][r.layer].sqnr
        if "propagated" in modes:
            r.sqnr_propagated = acc["propagated"][r.layer].sqnr
            r.mse_propagated = acc["propagated"][r.layer].mse
    transformed = [q.label for q in matched
                   if _weights_differ(float_modules[q.name], quant_model.get_submodule(q.name))]
    return LayerErrorReport(results, tuple(modes), unmatched, out_acc.sqnr,
                            float(sum(psnrs) / len(psnrs)) if psnrs else float("nan"),
                            transformed)


def _weights_differ(a: nn.Module, b: nn.Module) -> bool:
    wa, wb = getattr(a, "weight", None), getattr(b, "weight", None)
    if not isinstance(wa, torch.Tensor) or not isinstance(wb, torch.Tensor):
        return False
    return wa.shape != wb.shape or not torch.equal(wa.detach(), wb.detach())


def _capture(name: str, inputs: dict, outputs: dict):
    def hook(module, args, output):
        inputs[name].append(args[0].detach())
        outputs[name].append(_first_tensor(output).detach())
    return hook
