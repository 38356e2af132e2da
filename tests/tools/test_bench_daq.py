"""tools/bench_daq.py: the Markdown it writes (not the timings, which are a benchmark's job)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_daq")


def test_write_section_replaces_only_its_own_section(bench, tmp_path):
    path = tmp_path / "performance.md"
    path.write_text("# Performance\n\n## DFSQ\n\nkeep me\n\n## DAQ\n\nold numbers\n\n"
                    "## Later\n\nkeep me too\n")
    bench.write_section(path, "## DAQ\n\nnew numbers\n")
    text = path.read_text()
    assert "old numbers" not in text and "new numbers" in text
    assert text.index("## DFSQ") < text.index("## DAQ") < text.index("## Later")
    assert "keep me\n" in text and "keep me too\n" in text
    bench.write_section(path, "## DAQ\n\nnewer\n")  # idempotent: one section, replaced again
    assert path.read_text().count("## DAQ") == 1 and "newer" in path.read_text()


def test_write_section_creates_the_file(bench, tmp_path):
    path = tmp_path / "new.md"
    bench.write_section(path, "## DAQ\n\nx\n")
    assert path.read_text() == "# Performance\n\n## DAQ\n\nx\n"


def test_model_table_ratios(bench):
    timings = {"imdn": {"float": 2.0, "daq-w4a4, weight fake-quant only": 2.5, "daq-w4a4": 6.0}}
    row = bench.model_table(timings, 64).splitlines()[-1]
    assert row == "| imdn | 3.00 | 1.25 | 1.75 |"


def test_main_writes_a_table_whose_reference_is_one(bench, tmp_path, capsys):
    out = tmp_path / "perf.md"
    assert bench.main(["--sizes", "8", "--rounds", "1", "--no-compile", "--models", "",
                       "--write", str(out)]) == 0
    text = out.read_text()
    assert "| fp32 conv 3×3 64→64 (reference) | 1.000 |" in text
    assert "stats only: torch.std_mean (signed)" in text and "Whole models" not in text
