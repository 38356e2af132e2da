"""tools/daq_lower_check.py: its tables have as many cells in every row as in the header (the
DAQ one with the unbalanced-codes column, the DFSQ one with the one-byte-codes column), and
mixed or unknown recipe kinds are refused before any model is built."""

from __future__ import annotations

import pytest


def _row(model: str, **extra) -> dict:
    row = {"model": model, "scale": 4, "recipe": "r", "layers": 3, "fake_psnr": 30.0,
           "reference_psnr": 30.01, "cpu_psnr": 29.99, "cpu1_psnr": 29.98,
           "reference_max_rel": 1e-6, "cpu_max_rel": 1e-4, "cpu1_max_rel": 1e-2,
           "relu_max_code": 7, "relu_over_255": 0, "relu_layers": 3}
    row.update(extra)
    return row


def _cells(line: str) -> int:
    return line.count("|") - 1


@pytest.mark.parametrize("kind, extra, column", [
    ("daq", {"cpu1u_psnr": 29.9, "cpu1u_max_rel": 2e-2}, "codes unbalanced"),
    ("dfsq", {"refu8_psnr": 29.995, "cpu1u8_psnr": 29.97, "refu8_max_rel": 5e-3,
              "cpu1u8_max_rel": 1.5e-2}, "u8 codes"),
])
def test_every_row_has_the_headers_cells(load_tool, kind, extra, column):
    tool = load_tool("daq_lower_check")
    text = tool.render([_row("imdn", **extra), _row("pan", **extra)], "cmd", tool.SECTIONS[kind])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert column in table[0] and len(table) == 4
    assert {_cells(line) for line in table} == {_cells(table[0])}
    assert "-0.0200" in table[2]  # cpu 1-plane − fake
    if kind == "dfsq":
        assert "-0.0050 / -0.0300 / 5.0e-03 / 1.5e-02" in table[2]


@pytest.mark.parametrize("recipes, message", [("daq-w4a4,dfsq-w4a4", "one kind per call"),
                                              ("mse-w4a4", "give DAQ presets")])
def test_mixed_or_unknown_recipe_kinds_are_refused(load_tool, capsys, recipes, message):
    tool = load_tool("daq_lower_check")
    assert tool.main(["--recipes", recipes]) == 2
    assert message in capsys.readouterr().err
