"""Text views of a graph: one row per node, with the quantizer it carries."""

from __future__ import annotations

from torch import fx

from fxquant.observers import Observer
from fxquant.quant.base import Quantizer


def node_quantizer(gm: fx.GraphModule, node: fx.Node) -> dict | None:
    """What quantizes this node: the quantizer/observer it is, or its weight quantizer."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if isinstance(module, (Quantizer, Observer)):
        return module.describe()
    weight_quantizer = getattr(module, "weight_quantizer", None)
    if isinstance(weight_quantizer, Quantizer):
        return {"weight": True, **weight_quantizer.describe()}
    return None


def format_quantizer(info: dict | None) -> str:
    if info is None:
        return ""
    parts = [f"{'weight ' if info.get('weight') else ''}{info['kind']}"]
    for key in ("bits", "granularity", "mode", "points"):
        if key in info and info[key] is not None:
            parts.append(f"{key}={info[key]}")
    return " ".join(parts)


def node_rows(gm: fx.GraphModule) -> list[dict]:
    rows = []
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        module = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else ""
        args = [a.name for a in node.all_input_nodes]
        rows.append({"node": node.name, "op": node.op, "target": str(target), "module": module,
                     "inputs": args, "quantizer": node_quantizer(gm, node)})
    return rows


def graph_table(gm: fx.GraphModule) -> str:
    """A fixed-width table of the graph, stable enough for golden tests."""
    rows = node_rows(gm)
    header = ("node", "op", "target", "module", "inputs", "quantizer")
    table = [header] + [(r["node"], r["op"], r["target"], r["module"], ",".join(r["inputs"]),
                         format_quantizer(r["quantizer"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = []
    for row in table:
        cells = [cell.ljust(w) for cell, w in zip(row[:-1], widths)] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
