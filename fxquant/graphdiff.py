"""Diff of two graph dumps: what a pass added, removed or changed.

Works on the text tables that :func:`fxquant.inspect.graph_table` writes (``fxquant compile
--dump-dir``, ``PassManager(dump_dir=...)``), or directly on GraphModules. Nodes are matched by
name; the two node sequences are aligned with :class:`difflib.SequenceMatcher` so the result
reads in graph order, like a unified diff::

    --- 02-calibrate.txt
    +++ 03-quantize.txt
    @@ 4 added, 4 removed, 4 changed, 9 unchanged @@
    - blocks_0_0_input_observer  call_module  ...  MinMaxObserver  head  minmax mode=observer
    + blocks_0_0_input_quantizer  call_module  ...  UniformQuantizer  head  uniform bits=4 ...
    ~ blocks_0_0: module Conv2d -> QuantConv2d; inputs blocks_0_0_input_observer -> ...
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path

from torch import fx

from fxquant.errors import FxquantError
from fxquant.inspect import graph_table

__all__ = ["parse_table", "GraphDiff", "diff_tables", "diff_graphs", "diff_files"]

COLUMNS = ("node", "op", "target", "module", "inputs", "quantizer")


def parse_table(text: str) -> list[dict]:
    """Rows of a :func:`~fxquant.inspect.graph_table` dump (column starts from the header)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("node"):
        raise ValueError("not a graph table: the first line must be the header "
                         f"'{'  '.join(COLUMNS)}' (written by fxquant.inspect.graph_table)")
    header = lines[0]
    starts = []
    for column in COLUMNS:
        position = header.find(column, starts[-1] + 1 if starts else 0)
        if position < 0:
            raise ValueError(f"graph table header lacks column '{column}': {header!r}")
        starts.append(position)
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        row = dict(zip(COLUMNS, cells))
        row["inputs"] = [i for i in row["inputs"].split(",") if i]
        rows.append(row)
    return rows


@dataclass
class GraphDiff:
    """Added, removed and changed nodes between graph ``a`` and graph ``b``.

    ``changed`` maps a node name to ``{field: (old, new)}``; ``entries`` is the aligned
    sequence of ``(tag, row_a, row_b)`` with tag ``' '``, ``'+'``, ``'-'`` or ``'~'``.
    """

    a_name: str
    b_name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    unchanged: int = 0
    entries: list[tuple[str, dict | None, dict | None]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.removed)} removed, "
                f"{len(self.changed)} changed, {self.unchanged} unchanged")

    def text(self, context: bool = False) -> str:
        """Unified-diff-like text; ``context`` also prints unchanged nodes (prefixed ``' '``)."""
        out = [f"--- {self.a_name}", f"+++ {self.b_name}", f"@@ {self.summary()} @@"]
        for tag, a, b in self.entries:
            if tag == " ":
                if context:
                    out.append("  " + _row_text(a))
            elif tag == "-":
                out.append("- " + _row_text(a))
            elif tag == "+":
                out.append("+ " + _row_text(b))
            else:
                changes = self.changed[a["node"]]
                out.append(f"~ {a['node']}: " + "; ".join(
                    f"{k} {_show(old)} -> {_show(new)}" for k, (old, new) in changes.items()))
        return "\n".join(out) + "\n"


def _show(value: str) -> str:
    return value if value else "(none)"


def _row_text(row: dict) -> str:
    return "  ".join(filter(None, [row["node"], row["op"], row["target"], row["module"],
                                   ",".join(row["inputs"]), row["quantizer"]]))


def _rows_of(graph) -> list[dict]:
    if isinstance(graph, fx.GraphModule):
        return parse_table(graph_table(graph))
    if isinstance(graph, str):
        return parse_table(graph)
    return list(graph)


def diff_tables(a, b, a_name: str = "a", b_name: str = "b") -> GraphDiff:
    """Diff two graphs given as table text, parsed rows or GraphModules."""
    rows_a, rows_b = _rows_of(a), _rows_of(b)
    names_a = [r["node"] for r in rows_a]
    names_b = [r["node"] for r in rows_b]
    by_b = {r["node"]: r for r in rows_b}
    by_a = {r["node"]: r for r in rows_a}
    result = GraphDiff(a_name, b_name)
    matcher = difflib.SequenceMatcher(a=names_a, b=names_b, autojunk=False)
    moved_b = set(names_a) & set(names_b)  # names present on both sides, even if reordered
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            for name in names_a[i1:i2]:
                _compare(result, by_a[name], by_b[name])
            continue
        for name in names_a[i1:i2]:
            if name in moved_b:
                _compare(result, by_a[name], by_b[name])
            else:
                result.removed.append(name)
                result.entries.append(("-", by_a[name], None))
        for name in names_b[j1:j2]:
            if name not in moved_b:
                result.added.append(name)
                result.entries.append(("+", None, by_b[name]))
    return result


def _compare(result: GraphDiff, a: dict, b: dict) -> None:
    changes = {}
    for key in COLUMNS[1:]:
        old, new = a[key], b[key]
        if key == "inputs":
            old, new = ",".join(old), ",".join(new)
        if old != new:
            changes[key] = (old, new)
    if changes:
        result.changed[a["node"]] = changes
        result.entries.append(("~", a, b))
    else:
        result.unchanged += 1
        result.entries.append((" ", a, b))


def diff_graphs(a: fx.GraphModule, b: fx.GraphModule, a_name: str = "before",
                b_name: str = "after") -> GraphDiff:
    return diff_tables(a, b, a_name, b_name)


def read_dump(path: str | Path) -> list[dict]:
    """The rows of a dump file, or an error that names the file and what it should be."""
    path = Path(path)
    written_by = "a node table written by fxquant compile --dump-dir or tools/graph_dump.py"
    try:
        return parse_table(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FxquantError(f"graph dump {path} does not exist; give {written_by}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FxquantError(f"cannot read graph dump {path} ({exc}); give {written_by}") from None


def diff_files(a: str | Path, b: str | Path) -> GraphDiff:
    """Diff two dump files (``NN-<pass>.txt``)."""
    a, b = Path(a), Path(b)
    return diff_tables(read_dump(a), read_dump(b), str(a.name), str(b.name))
