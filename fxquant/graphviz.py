"""Pictures of a graph: Graphviz DOT, and a self-contained SVG/HTML view drawn without ``dot``.

* :func:`to_dot` writes DOT text. Nodes are coloured by the kind of quantizer they carry
  (``uniform``, ``daq``, ``dfsq``, observers ...) or, given ``errors`` (``{layer: SQNR dB}``,
  e.g. ``LayerErrorReport.sqnr_map()``), quantized layers are coloured from red (worst SQNR) to
  green (best), as Samsung/ONE's error-coloured DOT does. Output is deterministic (golden tests).
* :func:`to_svg` draws the layered layout of :mod:`fxquant.graph_layout` (topological
  generations, ordered by the barycentre of the predecessors) and :func:`to_html` wraps it in
  a page with a legend, a zoom slider and a node search; no external reference, so the file
  works offline and ``dot`` is not needed.
* :class:`GraphDumper` is a ``dump_fn`` for :class:`~fxquant.pipeline.PassManager`: it returns
  the text table (written as ``NN-<pass>.txt``) and writes ``NN-<pass>.dot`` (and optionally
  ``.html``) beside it. :func:`write_dumps` writes one graph in several formats.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Mapping, Sequence

from torch import fx

from fxquant.files import atomic_write_text
from fxquant.graph_layout import (
    FLOAT_MODULE,
    FUNCTION_COLOUR,
    GAP_Y,
    IO_COLOUR,
    LINE_H,
    PAD_Y,
    Box,
    NodeStyle,
    error_colour,
    layered_layout,
    node_style,
)
from fxquant.inspect import graph_table, node_rows
from fxquant.pipeline import spec_name

__all__ = [
    "to_dot", "to_svg", "to_html", "GraphDumper", "write_dumps", "render", "FORMATS",
]

FORMATS = ("text", "dot", "html", "svg")
GRAPH_SUFFIXES = {"text": ".txt", "dot": ".dot", "html": ".html", "svg": ".svg"}  # for --out


# ----------------------------------------------------------------------------- DOT
def _q(text: str) -> str:
    """A DOT quoted string; line breaks become DOT's ``\\n`` escape."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def to_dot(gm: fx.GraphModule, *, errors: Mapping[str, float] | None = None,
           title: str | None = None, rankdir: str = "TB", legend: bool = True) -> str:
    """Graphviz DOT text of ``gm``; see the module docstring for colours."""
    styles = node_style(gm, errors)
    name = title or type(gm).__name__
    out = [f"digraph {_q(name)} {{"]
    graph_attrs = [f"rankdir={rankdir}", 'fontname="Helvetica"', "fontsize=11"]
    if title:
        graph_attrs += [f"label={_q(title)}", "labelloc=t"]
    out.append(f"  graph [{', '.join(graph_attrs)}];")
    out.append('  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=9, '
               'fillcolor="#ffffff", color="#555555"];')
    out.append('  edge [arrowsize=0.6, color="#555555"];')
    for s in styles:
        attrs = [f"label={_q(chr(10).join(s.lines))}", f"fillcolor={_q(s.fill)}"]
        if s.shape != "box":
            attrs.append(f"shape={s.shape}")
        if s.bold:
            attrs.append("penwidth=2")
        attrs.append(f"tooltip={_q(s.tooltip)}")
        out.append(f"  {_q(s.name)} [{', '.join(attrs)}];")
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            out.append(f"  {_q(source.name)} -> {_q(node.name)};")
    if legend:
        out.extend(_dot_legend(styles, errors))
    out.append("}")
    return "\n".join(out) + "\n"


def _legend_entries(styles: Sequence[NodeStyle], errors) -> list[tuple[str, str]]:
    if errors:
        finite = [s.error for s in styles if s.error is not None and math.isfinite(s.error)]
        if not finite:
            return []
        lo, hi = min(finite), max(finite)
        mid = (lo + hi) / 2
        return [(f"SQNR {v:.1f} dB", error_colour(v, lo, hi)) for v in (lo, mid, hi)]
    entries, seen = [], set()
    for s in styles:
        if s.fill in seen or s.fill in (FUNCTION_COLOUR, IO_COLOUR, FLOAT_MODULE):
            continue
        seen.add(s.fill)
        what = s.lines[-1]
        entries.append((what if len(what) < 60 else what[:57] + "...", s.fill))
    return entries


def _dot_legend(styles, errors) -> list[str]:
    entries = _legend_entries(styles, errors)
    if not entries:
        return []
    lines = ["  subgraph cluster_legend {", '    label="legend"; fontsize=9; color="#999999";']
    for i, (text, colour) in enumerate(entries):
        lines.append(f"    legend_{i} [label={_q(text)}, fillcolor={_q(colour)}];")
    lines.append("  }")
    return lines


# ----------------------------------------------------------------------------- SVG / HTML
_BOLD = ' font-weight="bold"'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _edge_path(a: Box, b: Box, boxes: dict[str, Box]) -> tuple[str, float]:
    """An S-curve from the bottom of ``a`` to the top of ``b``; an edge that skips layers and
    would cross boxes on the way (a residual connection) detours through a lane on the right."""
    x1, y1, x2, y2 = a.x, a.y + a.h, b.x, b.y
    lo, hi = min(x1, x2) - 4, max(x1, x2) + 4
    between = [c for c in boxes.values() if a.layer < c.layer < b.layer
               and c.x - c.w / 2 < hi and c.x + c.w / 2 > lo]
    if not between:
        dy = max((y2 - y1) / 2, 10.0)
        return (f"M{x1:.1f},{y1:.1f} C{x1:.1f},{y1 + dy:.1f} {x2:.1f},{y2 - dy:.1f} "
                f"{x2:.1f},{y2:.1f}"), max(x1, x2)
    lane = max(c.x + c.w / 2 for c in between) + 12 + 4 * ((b.layer - a.layer) % 4)
    top, bottom = y1 + GAP_Y * 0.8, y2 - GAP_Y * 0.8
    return (f"M{x1:.1f},{y1:.1f} C{x1:.1f},{top:.1f} {lane:.1f},{y1:.1f} {lane:.1f},{top:.1f} "
            f"L{lane:.1f},{bottom:.1f} C{lane:.1f},{y2:.1f} {x2:.1f},{bottom:.1f} "
            f"{x2:.1f},{y2:.1f}"), lane


def to_svg(gm: fx.GraphModule, *, errors: Mapping[str, float] | None = None,
           standalone: bool = True, id_prefix: str = "g") -> str:
    """SVG of ``gm`` on :func:`layered_layout`. ``standalone`` adds the XML namespace (for a
    ``.svg`` file); inline in HTML it is left out so the page holds no URL at all."""
    styles = node_style(gm, errors)
    boxes = layered_layout(gm, styles)
    edges = [(_edge_path(boxes[source.name], boxes[node.name], boxes))
             for node in gm.graph.nodes for source in node.all_input_nodes]
    width = max([b.x + b.w / 2 for b in boxes.values()] + [x for _, x in edges] + [0.0]) + 10
    height = max((b.y + b.h for b in boxes.values()), default=0.0) + 10
    ns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [f'<svg{ns} width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="monospace" font-size="10" '
           f'class="fxq-graph">',
           f'<defs><marker id="{id_prefix}-arrow" viewBox="0 0 10 10" refX="10" refY="5" '
           'markerWidth="6" markerHeight="6" orient="auto-start-reverse">'
           '<path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>',
           '<g class="edges" fill="none" stroke="#777" stroke-width="1">']
    for path, _ in edges:
        out.append(f'<path d="{path}" marker-end="url(#{id_prefix}-arrow)"/>')
    out.append("</g>")
    out.append('<g class="nodes">')
    for s in styles:
        b = boxes[s.name]
        x0 = b.x - b.w / 2
        stroke = ' stroke-width="2"' if s.bold else ""
        if s.shape == "ellipse":
            shape = (f'<ellipse cx="{b.x:.1f}" cy="{b.y + b.h / 2:.1f}" rx="{b.w / 2:.1f}" '
                     f'ry="{b.h / 2:.1f}" fill="{s.fill}" stroke="#555"{stroke}/>')
        else:
            shape = (f'<rect x="{x0:.1f}" y="{b.y:.1f}" width="{b.w:.1f}" height="{b.h:.1f}" '
                     f'rx="4" fill="{s.fill}" stroke="#555"{stroke}/>')
        texts = "".join(
            f'<text x="{b.x:.1f}" y="{b.y + PAD_Y + LINE_H * (i + 0.78):.1f}" '
            f'text-anchor="middle"{_BOLD if i == 0 else ""}>{_e(line)}</text>'
            for i, line in enumerate(s.lines))
        out.append(f'<g class="node" data-name="{_e(s.name)}"><title>{_e(s.tooltip)}</title>'
                   f"{shape}{texts}</g>")
    out.append("</g></svg>")
    return "\n".join(out) + "\n"


def legend_html(gm: fx.GraphModule, errors: Mapping[str, float] | None = None) -> str:
    entries = _legend_entries(node_style(gm, errors), errors)
    items = "".join(f'<span class="fxq-key"><span class="fxq-swatch" style="background:{c}">'
                    f"</span>{_e(t)}</span>" for t, c in entries)
    return f'<div class="fxq-legend">{items}</div>'


_PAGE_CSS = """
body { font-family: sans-serif; margin: 1em; }
.fxq-legend { margin: 0.5em 0; font-size: 12px; }
.fxq-key { display: inline-block; margin-right: 1.2em; }
.fxq-swatch { display: inline-block; width: 1.1em; height: 0.9em; border: 1px solid #555;
              vertical-align: middle; margin-right: 0.3em; }
.fxq-view { overflow: auto; border: 1px solid #ccc; max-height: 85vh; }
.fxq-graph .node.hit rect, .fxq-graph .node.hit ellipse { stroke: #e6007e; stroke-width: 4; }
"""

_PAGE_JS = """
(function () {
  var svg = document.querySelector('.fxq-view svg');
  var w = svg.getAttribute('width'), h = svg.getAttribute('height');
  document.getElementById('fxq-zoom').addEventListener('input', function (ev) {
    var z = ev.target.value / 100;
    svg.setAttribute('width', w * z); svg.setAttribute('height', h * z);
  });
  document.getElementById('fxq-find').addEventListener('input', function (ev) {
    var q = ev.target.value.toLowerCase(), first = null;
    document.querySelectorAll('.fxq-graph .node').forEach(function (n) {
      var hit = q && n.getAttribute('data-name').toLowerCase().indexOf(q) >= 0;
      n.classList.toggle('hit', !!hit);
      if (hit && !first) { first = n; }
    });
    if (first) { first.scrollIntoView({block: 'center', inline: 'center'}); }
  });
})();
"""


def to_html(gm: fx.GraphModule, *, errors: Mapping[str, float] | None = None,
            title: str = "fxquant graph") -> str:
    """A self-contained HTML page: the SVG drawing, a legend, zoom and node search."""
    svg = to_svg(gm, errors=errors, standalone=False)
    quantized = sum(1 for r in node_rows(gm) if r["quantizer"] is not None)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_PAGE_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n"
            f"<p>{len(gm.graph.nodes)} nodes, {quantized} carry a quantizer or observer. "
            "Hover a node for its details.</p>\n"
            '<label>zoom <input id="fxq-zoom" type="range" min="10" max="200" value="100">'
            '</label> <label>find node <input id="fxq-find" type="search"></label>\n'
            f"{legend_html(gm, errors)}\n<div class=\"fxq-view\">\n{svg}</div>\n"
            f"<script>{_PAGE_JS}</script>\n</body></html>\n")


# ----------------------------------------------------------------------------- dumps
def render(gm: fx.GraphModule, fmt: str, *, errors: Mapping[str, float] | None = None,
           title: str | None = None) -> str:
    """``gm`` as ``text`` (the node table), ``dot``, ``svg`` or ``html``."""
    if fmt == "text":
        return graph_table(gm)
    if fmt == "dot":
        return to_dot(gm, errors=errors, title=title)
    if fmt == "svg":
        return to_svg(gm, errors=errors)
    if fmt == "html":
        return to_html(gm, errors=errors, title=title or "fxquant graph")
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


_SUFFIX = {"text": "txt", "dot": "dot", "svg": "svg", "html": "html"}


def write_dumps(gm: fx.GraphModule, stem: str | Path, formats: Sequence[str] = ("text", "dot"),
                *, errors: Mapping[str, float] | None = None) -> list[Path]:
    """Write ``<stem>.txt``, ``<stem>.dot`` ... for each format; returns the paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{_SUFFIX[fmt]}")
        atomic_write_text(path, render(gm, fmt, errors=errors, title=stem.name), "graph dump")
        paths.append(path)
    return paths


class GraphDumper:
    """A ``dump_fn`` for :class:`~fxquant.pipeline.PassManager` that also writes DOT (and any
    of ``svg``/``html``) next to the text dumps::

        ctx = PassContext(recipe=recipe, calib=[(calib,)])
        manager = PassManager(recipe.pipeline_spec, dump_dir="dumps",
                              dump_fn=GraphDumper("dumps", ctx=ctx))
        gm = manager.run(model, ctx)   # dumps/00-trace.txt, dumps/00-trace.dot, ...

    The manager writes ``NN-<pass>.txt`` from the returned text; this writes
    ``NN-<pass>.<fmt>`` for the other formats, taking the pass name from ``ctx.history``
    (``NN-graph`` without a context).
    """

    def __init__(self, dump_dir: str | Path, formats: Sequence[str] = ("dot",), ctx=None):
        self.dump_dir = Path(dump_dir)
        self.formats = [f for f in formats if f != "text"]
        for fmt in self.formats:
            if fmt not in FORMATS:
                raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
        self.ctx = ctx
        self.index = 0

    def __call__(self, gm: fx.GraphModule) -> str:
        name = "graph"
        if self.ctx is not None and self.ctx.history:
            name = spec_name(self.ctx.history[-1][0])
        stem = self.dump_dir / f"{self.index:02d}-{name}"
        self.index += 1
        write_dumps(gm, stem, self.formats)
        return graph_table(gm)
