"""The benchmark harness: interleaving, ratios, peak memory, the Markdown it writes."""

from __future__ import annotations

import argparse

import pytest
import torch

from fxquant.bench import Row, interleaved, peak_memory_mb, render, summarize
from fxquant.markdown import write_section


def test_rounds_interleave_every_variant():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("a", "b", "c")}
    times = interleaved(fns, rounds=3, warmup=1)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3  # warm-up, then one of each per round
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_ratios_are_per_round_against_the_baseline():
    rows = summarize("m", {"fp32_eager": [1.0, 2.0, 3.0], "fast": [0.5, 0.5, 1.0]})
    fast = rows[1]
    assert fast.ratio == 3.0 and fast.ratio_min == 2.0 and fast.ratio_max == 4.0
    assert fast.median_ms == 500.0 and rows[0].ratio == 1.0


def test_peak_memory_sees_a_temporary_allocation():
    def work():
        t = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, freed on return
        return float(t[0])

    peak = peak_memory_mb(work)
    if peak is None:
        pytest.skip("no mallinfo2 in this C library")
    assert 60 <= peak < 200


def test_render_and_section_replacement(tmp_path):
    args = argparse.Namespace(scale=4, size=64, rounds=3, recipe="mse-w8a8-sym")
    breakdowns = {"m": {"lowered cpu": [("onednn::qconv_pointwise", 1.5, 0.6)]}}
    rows = [Row("m", "fp32_eager", 10.0, 1.0, 1.0, 1.0, 5.0, 30.0, "eager"),
            Row("m", "pt2e_int8", note="unavailable: ValueError: boom")]
    text = render(rows, args, "fxquant bench --models m", breakdowns)
    assert "| m | fp32_eager | 10.0 | 1.00× (1.00–1.00) | 5 | 30.000 | eager |" in text
    assert "| m | pt2e_int8 | — | — | — | — | unavailable: ValueError: boom |" in text
    assert "| `onednn::qconv_pointwise` | 1.50 | 60 % |" in text
    doc = tmp_path / "perf.md"
    doc.write_text("# Performance\n\n## DAQ\n\nkept\n\n## Integer execution (fxquant bench)\n\nold\n"
                   "\n## DFSQ\n\nalso kept\n")
    write_section(doc, "## Integer execution (fxquant bench)", text)
    out = doc.read_text()
    assert "old" not in out and "kept" in out and "also kept" in out and text.strip() in out
    assert out.index("## DAQ") < out.index("## Integer execution") < out.index("## DFSQ")
    assert [p.name for p in tmp_path.iterdir()] == ["perf.md"]  # no temporary left behind


def test_section_option_names_the_heading_and_is_checked(tmp_path):
    from fxquant.bench import build_parser, run
    from fxquant.errors import FxquantError

    args = build_parser().parse_args(["--section", "## At 256×256"])
    args.recipe = "mse-w8a8-sym"
    text = render([Row("m", "fp32_eager", 10.0, 1.0, 1.0, 1.0, 5.0, None, "eager")], args, "cmd")
    assert text.startswith("## At 256×256\n")
    bad = build_parser().parse_args(["--section", "At 256", "--models", "nosuch"])
    bad.argv = []
    with pytest.raises(FxquantError, match="must be one Markdown '## ' heading"):
        run(bad)


def test_the_table_names_its_cpu(tmp_path):
    from fxquant.bench import cpu_description

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_description(str(info)).startswith("AMD EPYC (family 26, model 2), ")
    assert cpu_description(str(tmp_path / "absent")).endswith("logical CPUs")
    args = argparse.Namespace(scale=4, size=64, rounds=3, recipe="mse-w8a8-sym")
    text = render([Row("m", "fp32_eager", 10.0, 1.0, 1.0, 1.0, 5.0, None, "eager")], args, "cmd")
    assert cpu_description() in text and f"torch {torch.__version__}" in text
