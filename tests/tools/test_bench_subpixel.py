"""tools/bench_subpixel.py: it checks both forms equal before timing them and prints one row
per case (the timings themselves are a benchmark's job)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_subpixel.py"


def test_prints_a_row_per_case(capsys):
    spec = importlib.util.spec_from_file_location("bench_subpixel", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--channels", "4", "--size", "9", "--scale", "3", "--rounds", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| ConvTranspose2d, NCHW", "| ConvTranspose2d, NHWC", "| sub-pixel conv, NCHW",
        "| sub-pixel conv, NHWC"]
