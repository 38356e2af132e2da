"""tools/bench_upsample.py: it checks the three forms equal before timing them and prints one row
per case (the timings themselves are a benchmark's job)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prints_a_row_per_case(capsys, load_tool):
    module = load_tool("bench_upsample")
    assert module.main(["--channels", "2", "--size", "6", "--scale", "2", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| aten (eager)", "| inductor-generated", "| fxquant::upsample in a compiled graph"]
