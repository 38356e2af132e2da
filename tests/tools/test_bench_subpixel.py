"""tools/bench_subpixel.py: it checks both forms equal before timing them and prints one row
per case (the timings themselves are a benchmark's job)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prints_a_row_per_case(capsys, load_tool):
    module = load_tool("bench_subpixel")
    assert module.main(["--channels", "4", "--size", "9", "--scale", "3", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| ConvTranspose2d, NCHW", "| ConvTranspose2d, NHWC", "| sub-pixel conv, NCHW",
        "| sub-pixel conv, NHWC"]
