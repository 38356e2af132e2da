"""What a picture of a graph shows and where, whatever the output format.

* :func:`node_style` gives each node a :class:`NodeStyle`: label lines, a fill coloured by the
  kind of quantizer it carries (:data:`KIND_COLOURS`) or, given ``errors``, by its SQNR
  (:func:`error_colour`, red worst to green best), a shape and a tooltip.
* :func:`layered_layout` places the nodes' boxes on the topological generations of the graph
  (networkx), ordered within a generation by the barycentre of their predecessors.

fxquant/graphviz.py renders these as DOT, SVG and HTML and writes the dumps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import networkx as nx
from torch import fx

from fxquant.inspect import format_quantizer, node_rows

__all__ = ["KIND_COLOURS", "node_style", "error_colour", "layered_layout"]


# ----------------------------------------------------------------------------- node styles
# Fill colours per quantizer kind: (activation quantizer / observer node, quantized layer).
KIND_COLOURS: dict[str, tuple[str, str]] = {
    "uniform": ("#c6dbef", "#6baed6"),
    "daq": ("#c7e9c0", "#74c476"),
    "dfsq": ("#fdd0a2", "#fd8d3c"),
    "minmax": ("#e5e1f0", "#bcbddc"),
    "histogram": ("#e5e1f0", "#bcbddc"),
    "moments": ("#e5e1f0", "#bcbddc"),
    "observer": ("#e5e1f0", "#bcbddc"),
}
_OTHER_PALETTE = [("#fcc5c0", "#f768a1"), ("#d9f0a3", "#addd8e"), ("#fff7bc", "#fec44f"),
                  ("#d0d1e6", "#a6bddb"), ("#ccece6", "#66c2a4")]
FLOAT_MODULE = "#ffffff"
IO_COLOUR = "#eeeeee"
FUNCTION_COLOUR = "#f7f7f7"


def kind_colours(kind: str) -> tuple[str, str]:
    """The (light, strong) fill colours of a quantizer kind; unknown kinds get a stable one."""
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    digest = int(hashlib.sha1(kind.encode()).hexdigest(), 16)
    return _OTHER_PALETTE[digest % len(_OTHER_PALETTE)]


def error_colour(value: float, lo: float, hi: float) -> str:
    """Red (``lo``, worst) → yellow → green (``hi``, best) for a dB value."""
    if math.isnan(value):
        return "#dddddd"
    t = 1.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    stops = [(0.0, (215, 48, 39)), (0.5, (254, 224, 139)), (1.0, (26, 152, 80))]
    for (t0, c0), (t1, c1) in zip(stops, stops[1:]):
        if t <= t1:
            f = (t - t0) / (t1 - t0)
            rgb = [round(a + (b - a) * f) for a, b in zip(c0, c1)]
            return "#{:02x}{:02x}{:02x}".format(*rgb)
    return "#1a9850"


@dataclass(frozen=True)
class NodeStyle:
    """How one node is drawn: label lines, fill, shape, and the tooltip text."""

    name: str
    lines: tuple[str, ...]
    fill: str
    shape: str  # box | ellipse | note
    bold: bool
    tooltip: str
    error: float | None = None


def _error_range(errors: Mapping[str, float]) -> tuple[float, float]:
    finite = [v for v in errors.values() if v is not None and math.isfinite(v)]
    return (min(finite), max(finite)) if finite else (0.0, 1.0)


def node_style(gm: fx.GraphModule, errors: Mapping[str, float] | None = None,
               ) -> list[NodeStyle]:
    """One :class:`NodeStyle` per node, in graph order."""
    rows = node_rows(gm)
    lo, hi = _error_range(errors) if errors else (0.0, 1.0)
    styles = []
    for row in rows:
        info = row["quantizer"]
        lines = [row["node"]]
        if row["op"] == "call_module":
            lines.append(row["module"])
        elif row["op"] in ("call_function", "call_method", "get_attr"):
            lines.append(row["target"])
        else:
            lines.append(row["op"])
        if info is not None:
            lines.append(format_quantizer(info))
        fill, shape, bold = FUNCTION_COLOUR, "box", False
        if row["op"] in ("placeholder", "output"):
            fill, shape = IO_COLOUR, "ellipse"
        elif row["op"] == "get_attr":
            shape = "note"
        elif row["op"] == "call_module":
            fill = FLOAT_MODULE
            if info is not None:
                light, strong = kind_colours(str(info.get("kind", "quantizer")))
                fill, bold = (strong, True) if info.get("weight") else (light, False)
        error = None
        if errors is not None:
            key = row["target"] if row["target"] in errors else row["node"]
            if key in errors and row["op"] == "call_module":
                error = float(errors[key])
                fill, bold = error_colour(error, lo, hi), True
                lines.append(f"SQNR {error:.1f} dB")
            elif row["op"] == "call_module" and info is not None and not info.get("weight"):
                fill = "#f0f0f0"
        tooltip = "\n".join(filter(None, [
            f"{row['node']} ({row['op']})",
            f"target: {row['target']}" if row["target"] != row["node"] else "",
            f"module: {row['module']}" if row["module"] else "",
            f"inputs: {', '.join(row['inputs'])}" if row["inputs"] else "",
            f"quantizer: {format_quantizer(info)}" if info else "",
            f"SQNR: {error:.2f} dB" if error is not None else ""]))
        styles.append(NodeStyle(row["node"], tuple(lines), fill, shape, bold, tooltip, error))
    return styles


# ----------------------------------------------------------------------------- layout
CHAR_W = 6.0      # px per character of the 10px monospace label font
LINE_H = 13.0
PAD_X, PAD_Y = 8.0, 5.0
GAP_X, GAP_Y = 18.0, 30.0


@dataclass
class Box:
    x: float  # centre
    y: float  # top
    w: float
    h: float
    layer: int = 0


def layered_layout(gm: fx.GraphModule, styles: Sequence[NodeStyle] | None = None,
                   ) -> dict[str, Box]:
    """Node boxes on topological generations, ordered by predecessor barycentres."""
    styles = styles or node_style(gm)
    by_name = {s.name: s for s in styles}
    graph = nx.DiGraph()
    order = {}
    for i, node in enumerate(gm.graph.nodes):
        graph.add_node(node.name)
        order[node.name] = i
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    sizes = {n: (max(len(line) for line in by_name[n].lines) * CHAR_W + 2 * PAD_X,
                 len(by_name[n].lines) * LINE_H + 2 * PAD_Y) for n in graph.nodes}
    boxes: dict[str, Box] = {}
    y = 0.0
    for level, generation in enumerate(nx.topological_generations(graph)):
        desired = {}
        for n in generation:
            preds = [boxes[p].x for p in graph.predecessors(n) if p in boxes]
            desired[n] = sum(preds) / len(preds) if preds else 0.0
        ranked = sorted(generation, key=lambda n: (desired[n], order[n]))
        xs, cursor = [], -math.inf
        for n in ranked:  # left to right, no overlaps
            w = sizes[n][0]
            x = max(desired[n], cursor + w / 2)
            xs.append(x)
            cursor = x + w / 2 + GAP_X
        shift = sum(desired[n] - x for n, x in zip(ranked, xs)) / len(ranked)
        height = max(sizes[n][1] for n in ranked)
        for n, x in zip(ranked, xs):
            boxes[n] = Box(x + shift, y + (height - sizes[n][1]) / 2, *sizes[n], level)
        y += height + GAP_Y
    left = min(b.x - b.w / 2 for b in boxes.values()) if boxes else 0.0
    for b in boxes.values():
        b.x -= left - 10.0
    return boxes
