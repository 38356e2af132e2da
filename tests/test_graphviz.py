"""Graph dumps: text table, DOT (golden), SVG/HTML view, dump_fn for the pass manager, diffs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import torch

import fxquant
from fxquant import PassContext, PassManager, resolve_recipe
from fxquant.graph_layout import error_colour, kind_colours, layered_layout
from fxquant.graphdiff import diff_files, diff_graphs, diff_tables, parse_table
from fxquant.graphviz import GraphDumper, render, to_dot, to_html, to_svg, write_dumps
from fxquant.inspect import graph_table, node_rows

pytestmark = pytest.mark.usefixtures("one_thread")

# Fixed SQNRs so the error-coloured golden does not depend on floating point.
FAKE_ERRORS = {"blocks.0.0": 12.0, "blocks.0.2": 30.0, "blocks.1.0": 3.5, "blocks.1.2": 21.0}


@pytest.fixture
def quantized(tiny_sr, calib):
    return fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib)


def test_text_dump_golden(quantized, golden):
    """The text dump is pinned by the same golden file as the quantize pass's test."""
    assert render(quantized, "text") == graph_table(quantized)
    golden("tiny_sr.quantize.txt", render(quantized, "text"))


def test_dot_golden(quantized, golden):
    golden("tiny_sr.quantize.dot", to_dot(quantized, title="tiny_sr quantize"))


def test_error_coloured_dot_golden(quantized, golden):
    dot = to_dot(quantized, errors=FAKE_ERRORS, title="tiny_sr per-layer SQNR")
    golden("tiny_sr.errors.dot", dot)
    worst = re.search(r'"blocks_1_0" \[label="[^"]*SQNR 3\.5 dB", fillcolor="([^"]+)"', dot)
    best = re.search(r'"blocks_0_2" \[label="[^"]*SQNR 30\.0 dB", fillcolor="([^"]+)"', dot)
    assert worst and best
    assert worst.group(1) == error_colour(3.5, 3.5, 30.0) == "#d73027"  # red
    assert best.group(1) == error_colour(30.0, 3.5, 30.0) == "#1a9850"  # green


def test_dot_is_well_formed(quantized):
    dot = to_dot(quantized)
    assert dot.startswith("digraph ") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    edges = re.findall(r'^  "([^"]+)" -> "([^"]+)";$', dot, re.M)
    expected = [(src.name, n.name) for n in quantized.graph.nodes for src in n.all_input_nodes]
    assert edges == expected
    # every quantized layer is drawn in the strong colour of its quantizer kind
    assert dot.count(f'fillcolor="{kind_colours("uniform")[1]}"') == 4 + 1  # 4 layers + legend
    assert kind_colours("some-new-kind") == kind_colours("some-new-kind")  # stable fallback


def test_layout_is_layered_without_overlaps(quantized):
    boxes = layered_layout(quantized)
    assert set(boxes) == {n.name for n in quantized.graph.nodes}
    for node in quantized.graph.nodes:
        for src in node.all_input_nodes:
            assert boxes[src.name].layer < boxes[node.name].layer
            assert boxes[src.name].y + boxes[src.name].h < boxes[node.name].y
    by_layer: dict[int, list] = {}
    for b in boxes.values():
        by_layer.setdefault(b.layer, []).append(b)
    for row in by_layer.values():
        row.sort(key=lambda b: b.x)
        for left, right in zip(row, row[1:]):
            assert left.x + left.w / 2 <= right.x - right.w / 2


def test_svg_is_valid_xml_with_a_group_per_node(quantized):
    svg = to_svg(quantized, errors=FAKE_ERRORS)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    names = [g.get("data-name") for g in root.iter(f"{ns}g") if g.get("class") == "node"]
    assert names == [n.name for n in quantized.graph.nodes]
    assert len([p for p in root.iter(f"{ns}path") if p.get("marker-end")]) == \
        sum(len(n.all_input_nodes) for n in quantized.graph.nodes)
    assert "SQNR 3.5 dB" in svg


def test_html_view_is_self_contained(quantized):
    page = to_html(quantized, errors=FAKE_ERRORS, title="tiny <sr>")
    assert "<title>tiny &lt;sr&gt;</title>" in page
    for bad in ("http://", "https://", 'src="//', "<link", "<script src", "@import"):
        assert bad not in page
    for node in quantized.graph.nodes:
        assert f'data-name="{node.name}"' in page
    ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])  # inline SVG parses


def test_write_dumps_and_dumper_with_the_pass_manager(tiny_sr, calib, tmp_path):
    recipe = resolve_recipe("minmax-w4a4")
    ctx = PassContext(recipe=recipe, calib=calib)
    dumper = GraphDumper(tmp_path, formats=("dot", "html"), ctx=ctx)
    gm = PassManager(recipe.pipeline_spec, dump_dir=tmp_path, dump_fn=dumper).run(tiny_sr, ctx)
    stems = ["00-trace", "01-observe", "02-calibrate", "03-quantize", "04-verify"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{s}.{ext}" for s in stems for ext in ("txt", "dot", "html"))
    assert (tmp_path / "04-verify.txt").read_text() == graph_table(gm)
    assert (tmp_path / "04-verify.dot").read_text() == to_dot(gm, title="04-verify")
    written = write_dumps(gm, tmp_path / "again" / "final", ("text", "dot", "svg"))
    assert [p.name for p in written] == ["final.txt", "final.dot", "final.svg"]
    with pytest.raises(ValueError, match="unknown format"):
        GraphDumper(tmp_path, formats=("png",))
    plain = GraphDumper(tmp_path / "plain")
    plain(gm)
    assert (tmp_path / "plain" / "00-graph.dot").exists()


def test_parse_table_round_trips_node_rows(quantized):
    rows = parse_table(graph_table(quantized))
    expected = node_rows(quantized)
    assert [r["node"] for r in rows] == [r["node"] for r in expected]
    assert [r["inputs"] for r in rows] == [r["inputs"] for r in expected]
    assert [r["module"] for r in rows] == [r["module"] for r in expected]
    with pytest.raises(ValueError, match="not a graph table"):
        parse_table("digraph {}")


def test_diff_golden_observe_to_quantize(tiny_sr, calib, tmp_path, golden):
    recipe = resolve_recipe("minmax-w4a4")
    ctx = PassContext(recipe=recipe, calib=calib)
    PassManager(recipe.pipeline_spec, dump_dir=tmp_path).run(tiny_sr, ctx)
    diff = diff_files(tmp_path / "01-observe.txt", tmp_path / "03-quantize.txt")
    assert diff.added == [f"{n}_input_quantizer" for n in
                          ("blocks_0_0", "blocks_0_2", "blocks_1_0", "blocks_1_2")]
    assert diff.removed == [a.replace("quantizer", "observer") for a in diff.added]
    assert set(diff.changed) == {"blocks_0_0", "blocks_0_2", "blocks_1_0", "blocks_1_2"}
    assert diff.changed["blocks_0_0"]["module"] == ("Conv2d", "QuantConv2d")
    golden("tiny_sr.observe-quantize.diff", diff.text())
    full = diff.text(context=True)
    assert "\n  head  call_module  head  Conv2d  x\n" in full


def test_diff_of_identical_graphs_is_empty(quantized):
    diff = diff_graphs(quantized, quantized)
    assert diff.empty and diff.unchanged == len(quantized.graph.nodes)
    assert diff.text().splitlines()[2] == \
        f"@@ 0 added, 0 removed, 0 changed, {len(quantized.graph.nodes)} unchanged @@"


def test_diff_handles_reordered_nodes():
    a = [{"node": n, "op": "call_module", "target": n, "module": "M", "inputs": [],
          "quantizer": ""} for n in ("x", "a", "b", "y")]
    b = [dict(r) for r in (a[0], a[2], a[1], a[3])]
    diff = diff_tables(a, b)
    assert diff.empty and diff.unchanged == 4


@pytest.mark.slow
def test_cli_inspect_formats(data, tmp_path, capsys):
    """``fxquant inspect --compiled m.fxq --format dot|html --out f`` on a saved IMDN."""
    from fxquant.cli import main
    from fxquant.models import build_model

    model = build_model("imdn", 4, pretrained=True, data_root=data)
    calib = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = fxquant.compile(model, "minmax-w4a4", calib=calib)
    path = tmp_path / "imdn.fxq"
    fxquant.save(gm, path, model_name="imdn", scale=4)
    for fmt in ("dot", "html"):
        out = tmp_path / f"imdn.{fmt}"
        assert main(["inspect", "--compiled", str(path), "--data", str(data), "--format", fmt,
                     "--out", str(out)]) == 0
        assert f"wrote {out}" in capsys.readouterr().out
    assert (tmp_path / "imdn.dot").read_text() == to_dot(gm, title=str(path))
    assert "IMDB5.c5" in (tmp_path / "imdn.html").read_text()
    assert main(["inspect", "--compiled", str(path), "--data", str(data)]) == 0
    assert capsys.readouterr().out == graph_table(gm)
