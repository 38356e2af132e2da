"""The benchmark harness: interleaving, ratios, peak memory, the Markdown it writes."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from fxquant.bench import Row, interleaved, peak_memory_mb, sign_test, summarize
from fxquant.bench_table import render
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
        # held while the GIL is free, as a forward holds its activations: once an earlier test
        # in this worker kept freed blocks on the heap (fxquant.heap), the allocation takes no
        # page faults and can come and go before the sampler thread runs at all
        time.sleep(0.02)
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


def test_the_table_names_its_cpu(tmp_path, monkeypatch):
    from fxquant.bench_table import cpu_description
    from fxquant.lower.int8_pairs import OVERRIDE

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert cpu_description(str(info)).startswith("AMD EPYC (family 26, model 2), ")
    assert cpu_description(str(tmp_path / "absent")).endswith("logical CPUs")
    args = argparse.Namespace(scale=4, size=64, rounds=3, recipe="mse-w8a8-sym")
    text = render([Row("m", "fp32_eager", 10.0, 1.0, 1.0, 1.0, 5.0, None, "eager")], args, "cmd")
    assert cpu_description() in text and f"torch {torch.__version__}" in text
    for pairs, kind in (("exact", "(int8 with VNNI)"),
                        ("saturating", "(no VNNI: 8-bit convs run two weight planes)")):
        monkeypatch.setenv(OVERRIDE, pairs)  # whether int8 is exact here decides its speed
        assert f"{cpu_description()} {kind}, torch" in render(
            [Row("m", "fp32_eager", 10.0, 1.0, 1.0, 1.0, 5.0, None, "eager")], args, "cmd")


def test_ratios_against_another_baseline_and_without_one():
    """``--baseline pt2e_int8`` compares two int8 paths round by round; a model where the
    baseline could not be built (PT2E on CARN-M) keeps its times and shows no ratio."""
    times = {"pt2e_int8": [2.0, 4.0, 2.0], "lowered cpu": [1.0, 2.0, 4.0]}
    rows = {r.variant: r for r in summarize("m", times, baseline="pt2e_int8")}
    low = rows["lowered cpu"]
    assert (low.ratio, low.ratio_min, low.ratio_max) == (2.0, 0.5, 2.0)
    args = argparse.Namespace(scale=4, size=64, rounds=3, recipe="r", baseline="pt2e_int8")
    text = render(list(rows.values()), args, "cmd")
    assert "| speed-up vs PT2E int8 (min–max) |" in text
    assert "ratio = PT2E int8 time / variant time" in text
    assert (low.faster_rounds, low.paired_rounds) == (2, 3)
    assert rows["pt2e_int8"].faster_rounds is None  # the baseline is not raced against itself
    assert "faster in 2/3, p = 0.5 |" in text  # P(X >= 2 | n = 3) = 4/8
    alone = summarize("m", {"lowered cpu": [1.0, 3.0]}, baseline="pt2e_int8")[0]
    assert alone.ratio is None and alone.median_ms == 2000.0
    assert "| m | lowered cpu | 2000.0 | — |" in render([alone], args, "cmd")


def test_variants_and_baseline_are_checked_before_measuring():
    from fxquant.bench import build_parser, run, variant_names
    from fxquant.errors import FxquantError

    args = build_parser().parse_args(["--variants", "lowered cpu,pt2e_int8",
                                      "--baseline", "pt2e_int8"])
    assert variant_names(args) == ["lowered cpu", "pt2e_int8"]
    for argv, message in ((["--variants", "lowered cpu,pt2e"], "unknown variant 'pt2e'"),
                          (["--variants", "lowered cpu"], "--baseline fp32_eager is not among"),
                          (["--baseline", "fp16"], "unknown variant 'fp16'")):
        bad = build_parser().parse_args(argv + ["--models", "nosuch"])
        bad.argv = argv
        with pytest.raises(FxquantError, match=message):
            run(bad)


def test_sign_test_counts_wins_leaves_ties_out_and_matches_the_binomial_tail():
    """p is the binomial tail P(X >= k | n, 1/2) over the rounds that were not ties: 9 wins
    of 10 give 11/1024; a tie changes nothing; no wins at all give p = 1."""
    faster, compared, p = sign_test([2.0] * 9 + [0.5])
    assert (faster, compared) == (9, 10) and abs(p - 11 / 1024) < 1e-12
    assert sign_test([2.0] * 9 + [0.5, 1.0])[:2] == (9, 10)
    assert sign_test([0.9, 0.8])[2] == 1.0 and sign_test([1.0])[1:] == (0, 1.0)


@pytest.mark.parametrize("flag", ["--rounds", "--size"])
def test_zero_rounds_or_size_is_refused_by_argparse(flag, capsys):
    """``--rounds 0`` used to end in statistics' "no median for empty data" after every
    variant was built, and ``--size 0`` in a conv's shape error; both are refused up front."""
    from fxquant.bench import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([flag, "0"])
    assert f"argument {flag}: 0 must be 1 or more" in capsys.readouterr().err


def test_one_plane_variant_runs_only_when_named_and_lowers_with_one_plane(tiny_sr, calib):
    """``lowered cpu 1-plane`` is ``lower{target=cpu,compile=true,planes=1}``: not in the
    default set, built (and only the named lowered variants built) when asked for."""
    from fxquant.bench import build_parser, fxquant_variants, variant_names
    from fxquant.lower.folded import CpuDaqConv2d

    assert "lowered cpu 1-plane" not in variant_names(build_parser().parse_args([]))
    named = build_parser().parse_args(["--variants", "fp32_eager,lowered cpu 1-plane"])
    assert variant_names(named) == ["fp32_eager", "lowered cpu 1-plane"]
    example = torch.rand(1, 3, 12, 12)
    built = fxquant_variants(tiny_sr, calib, "daq-w4a4", example, None,
                             names=["lowered cpu 1-plane"])
    assert [v.name for v in built] == ["fake-quant", "lowered cpu 1-plane"]
    assert built[1].note == "lower{target=cpu,compile=true,planes=1}"
    planes = {m.weight_planes for m in built[1].fn.modules()
              if isinstance(m, CpuDaqConv2d)}
    assert planes == {1}
