"""Activation distributions: per-(image, channel) ranges and histograms of any node, and plots.

:func:`activation_stats` runs a model on a few inputs and records, for each requested
activation, the min/max/mean/std of every (image, channel) pair and a histogram of all
values. Activations are named by module qualified name (``IMDB5.c5``: its input or output,
via forward hooks) or, for a GraphModule, by node name (``add_3``: the node's value, via an
``fx.Interpreter``). When a quantized GraphModule is given, :func:`quantizer_range` reads the
clipping range of the activation quantizer in front of a layer so plots can show it.

Plots need matplotlib (the optional ``viz`` extra: ``pip install 'fxquant[viz]'``); it is
imported only when a plot is drawn, with the Agg backend.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import fx, nn

from fxquant.errors import FxquantError

__all__ = [
    "MissingDependency", "ActivationStats", "activation_stats", "channel_stats",
    "capture_activations", "quantizer_range", "plot_channel_ranges", "plot_histogram",
    "plot_activation", "figure_to_png", "png_data_uri", "require_matplotlib",
]


class MissingDependency(FxquantError, ImportError):
    """An optional dependency (matplotlib, the ``viz`` extra) is not installed."""


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or :class:`MissingDependency` saying how to
    install it."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency(
            "plots need matplotlib, which is not installed: pip install 'fxquant[viz]' "
            "(or pip install matplotlib)") from None
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- capture
def _as_batches(inputs) -> list[torch.Tensor]:
    from fxquant.analysis import as_batches

    return as_batches(inputs)


def capture_activations(model: nn.Module, inputs, names: Sequence[str], *, where: str = "input",
                        fn: Callable | None = None,
                        reduce: Callable[[str, torch.Tensor], None] | None = None,
                        ) -> dict[str, list[torch.Tensor]]:
    """Run ``model`` on ``inputs`` and collect the named activations, one tensor per batch.

    A name is a module's qualified name (its ``where``: ``"input"`` or ``"output"``) or, for a
    GraphModule, a node name (the node's output value; ``"input"`` gives its first input's).
    With ``reduce(name, tensor)`` the tensors are passed on instead of kept (saves memory).
    """
    if where not in ("input", "output"):
        raise ValueError(f"where must be 'input' or 'output', got {where!r}")
    modules = dict(model.named_modules())
    collected: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def record(name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if reduce is not None:
            reduce(name, value)
        else:
            collected[name].append(value)

    from fxquant.analysis import split_label

    calls = {n: split_label(n) for n in names}  # "name@k": only the k-th call of a module
    module_names = [n for n in names if calls[n][0] in modules and calls[n][0]]
    node_names = [n for n in names if n not in module_names]
    graph_nodes = {}
    if node_names:
        if not isinstance(model, fx.GraphModule):
            raise ValueError(f"{node_names} are not submodules of {type(model).__name__}; node "
                             "names need a GraphModule")
        graph_nodes = {n.name: n for n in model.graph.nodes}
        missing = [n for n in node_names if n not in graph_nodes]
        if missing:
            raise ValueError(f"no module or node named {missing}; e.g. "
                             f"{', '.join(list(graph_nodes)[:6])}")

    handles = []
    counts: dict[str, int] = {}
    for name in module_names:
        module_name, wanted_call = calls[name]

        def hook(module, args, output, name=name, wanted_call=wanted_call):
            call = counts.get(name, 0)
            counts[name] = call + 1
            if wanted_call is not None and call != wanted_call:
                return
            value = args[0] if where == "input" else output
            record(name, value if isinstance(value, torch.Tensor) else value[0])
        handles.append(modules[module_name].register_forward_hook(hook))
    run = fn or model
    try:
        with torch.no_grad():
            for batch in _as_batches(inputs):
                counts.clear()
                if node_names:  # module hooks fire inside the interpreter too
                    _NodeRecorder(model, graph_nodes, node_names, where, record).run(batch)
                else:
                    run(batch)
    finally:
        for h in handles:
            h.remove()
    return collected


class _NodeRecorder(fx.Interpreter):
    def __init__(self, gm, nodes, names, where, record):
        super().__init__(gm)
        self.targets = {}
        for name in names:
            node = nodes[name]
            if where == "input":
                node = node.all_input_nodes[0] if node.all_input_nodes else node
            self.targets.setdefault(node.name, []).append(name)
        self.record = record

    def run_node(self, n):
        value = super().run_node(n)
        for name in self.targets.get(n.name, ()):
            if isinstance(value, torch.Tensor):
                self.record(name, value)
        return value


# ----------------------------------------------------------------------------- statistics
def channel_stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Min/max/mean/std (population) of each (image, channel) of an N×C×… tensor: N×C each."""
    flat = x.detach().float().flatten(2) if x.dim() > 2 else x.detach().float()[..., None]
    return {"min": flat.min(dim=2).values, "max": flat.max(dim=2).values,
            "mean": flat.mean(dim=2), "std": flat.std(dim=2, unbiased=False)}


@dataclass
class ActivationStats:
    """Statistics of one activation over several images.

    ``min``/``max``/``mean``/``std`` are images×channels; ``hist`` counts values in ``bins``
    equal bins over [``lo``, ``hi``] (the overall range); ``clip`` is the quantizer's
    clipping range when known.
    """

    name: str
    where: str
    min: torch.Tensor
    max: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    hist: torch.Tensor
    lo: float
    hi: float
    clip: tuple[float, float] | None = None
    count: int = 0
    labels: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return int(self.min.shape[0])

    @property
    def channels(self) -> int:
        return int(self.min.shape[1])

    def clipped_fraction(self) -> float | None:
        """Fraction of values outside the quantizer's clipping range (from the histogram)."""
        if self.clip is None or self.count == 0:
            return None
        edges = torch.linspace(self.lo, self.hi, len(self.hist) + 1, dtype=torch.float64)
        centres = (edges[:-1] + edges[1:]) / 2
        outside = (centres < self.clip[0]) | (centres > self.clip[1])
        return float(self.hist[outside].sum() / self.hist.sum())

    def summary(self) -> str:
        text = (f"{self.name} ({self.where}): {self.images} image(s) x {self.channels} channels, "
                f"range [{self.lo:.4g}, {self.hi:.4g}], mean {float(self.mean.mean()):.4g}, "
                f"std {float(self.std.mean()):.4g}")
        worst = int(torch.argmax(self.max.max(dim=0).values - self.min.min(dim=0).values))
        text += f", widest channel {worst}"
        if self.clip is not None:
            text += (f"; quantizer clips to [{self.clip[0]:.4g}, {self.clip[1]:.4g}] "
                     f"({100 * self.clipped_fraction():.3g}% of values outside)")
        return text


def activation_stats(model: nn.Module, inputs, names: Sequence[str], *, where: str = "input",
                     bins: int = 256, fn: Callable | None = None,
                     quant_model: fx.GraphModule | None = None,
                     labels: Sequence[str] | None = None) -> dict[str, ActivationStats]:
    """:class:`ActivationStats` of each named activation of ``model`` over ``inputs``.

    Each batch element counts as one image. With ``quant_model``, each stat's ``clip`` is the
    clipping range of the activation quantizer in front of the layer of the same name.
    """
    captured = capture_activations(model, inputs, names, where=where, fn=fn)
    result = {}
    for name in names:
        tensors = captured[name]
        if not tensors:
            raise ValueError(f"activation '{name}' was not reached by the forward pass")
        per = [channel_stats(t) for t in tensors]
        stacked = {k: torch.cat([p[k] for p in per]) for k in ("min", "max", "mean", "std")}
        lo = float(stacked["min"].min())
        hi = float(stacked["max"].max())
        if hi <= lo:
            hi = lo + 1e-8
        hist = sum(torch.histc(t.float(), bins=bins, min=lo, max=hi) for t in tensors)
        clip = quantizer_range(quant_model, name) if quant_model is not None else None
        result[name] = ActivationStats(name, where, stacked["min"], stacked["max"],
                                       stacked["mean"], stacked["std"], hist.double(), lo, hi,
                                       clip, sum(t.numel() for t in tensors),
                                       list(labels or []))
    return result


def quantizer_range(gm: fx.GraphModule, layer: str) -> tuple[float, float] | None:
    """The (lo, hi) a static uniform activation quantizer in front of ``layer`` (qualified
    name, ``name@call`` for a shared module, or node name) lets through, or None (dynamic,
    non-uniform or per-channel)."""
    from fxquant.analysis import split_label
    from fxquant.quant.base import Quantizer

    target, wanted_call = split_label(layer)
    call = -1
    for node in gm.graph.nodes:
        if node.op != "call_module" or (node.target != target and node.name != layer):
            continue
        call += 1
        if node.name != layer and wanted_call is not None and call != wanted_call:
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"):
            return None
        quantizer = gm.get_submodule(source.target)
        if not isinstance(quantizer, Quantizer):
            return None
        scale = getattr(quantizer, "scale", None)
        zero_point = getattr(quantizer, "zero_point", None)
        qmin, qmax = getattr(quantizer, "qmin", None), getattr(quantizer, "qmax", None)
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or qmin is None:
            return None
        zp = float(zero_point) if isinstance(zero_point, torch.Tensor) else 0.0
        return (qmin - zp) * float(scale), (qmax - zp) * float(scale)
    return None


# ----------------------------------------------------------------------------- plots
def plot_channel_ranges(stats: ActivationStats, ax=None, *, max_images: int = 4,
                        max_channels: int = 64):
    """Per-channel range plot: for each of the first images a vertical min..max bar per
    channel with a mean±std box, side by side; the quantizer range as dashed lines."""
    plt = require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3))
    n_img = min(stats.images, max_images)
    n_ch = min(stats.channels, max_channels)
    width = 0.8 / n_img
    colours = plt.get_cmap("tab10")
    for i in range(n_img):
        xs = torch.arange(n_ch, dtype=torch.float64) - 0.4 + width * (i + 0.5)
        lo, hi = stats.min[i, :n_ch], stats.max[i, :n_ch]
        mean, std = stats.mean[i, :n_ch], stats.std[i, :n_ch]
        label = stats.labels[i] if i < len(stats.labels) else f"image {i}"
        ax.vlines(xs, lo, hi, color=colours(i % 10), linewidth=1, label=label)
        ax.bar(xs, 2 * std, bottom=mean - std, width=width * 0.9, color=colours(i % 10),
               alpha=0.45)
    if stats.clip is not None:
        for value in stats.clip:
            ax.axhline(value, color="crimson", linestyle="--", linewidth=1)
        ax.plot([], [], color="crimson", linestyle="--", label="quantizer range")
    ax.set_xlim(-0.7, n_ch - 0.3)
    ax.set_xlabel("channel" + (f" (first {n_ch} of {stats.channels})"
                               if n_ch < stats.channels else ""))
    ax.set_ylabel("value")
    ax.set_title(f"{stats.name} {stats.where}: per-channel min..max, mean±std", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", ncol=min(n_img + 1, 5))
    return ax


def plot_histogram(stats: ActivationStats, ax=None, *, log: bool = True):
    """Histogram of every value (log counts), with the quantizer's range when known."""
    plt = require_matplotlib()
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 3))
    edges = torch.linspace(stats.lo, stats.hi, len(stats.hist) + 1).numpy()
    ax.stairs(stats.hist.numpy(), edges, fill=True, color="steelblue")
    if stats.clip is not None:
        for value in stats.clip:
            ax.axvline(value, color="crimson", linestyle="--", linewidth=1)
        fraction = stats.clipped_fraction()
        ax.text(0.98, 0.95, f"{100 * fraction:.2g}% clipped", transform=ax.transAxes,
                ha="right", va="top", fontsize=7, color="crimson")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{stats.name} {stats.where}: histogram", fontsize=9)
    return ax


def plot_activation(stats: ActivationStats):
    """A figure with the channel-range plot and the histogram side by side."""
    plt = require_matplotlib()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2),
                                      gridspec_kw={"width_ratios": [2.6, 1]})
    plot_channel_ranges(stats, left)
    plot_histogram(stats, right)
    fig.tight_layout()
    return fig


def figure_to_png(fig, dpi: int = 90) -> bytes:
    """PNG bytes of a matplotlib figure (the figure is closed)."""
    plt = require_matplotlib()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
