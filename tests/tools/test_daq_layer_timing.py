"""tools/daq_layer_timing.py: it runs every step of one lowered DAQ conv (a change to the codes
module's output once broke its unpacking), and refuses a bad size with argparse's error."""

from __future__ import annotations

import pytest


def test_every_step_runs_and_prints_a_time(load_tool, capsys):
    tool = load_tool("daq_layer_timing")
    assert tool.main(["8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    names = [row.split(" | ")[0][2:] for row in rows[1:]]
    assert "lowered conv, 1 weight plane(s)" in names and len(names) == 10
    assert all(float(row.split(" | ")[1].rstrip(" |")) >= 0 for row in rows[1:])


@pytest.mark.parametrize("argv, message", [(["abc"], "'abc' is not an integer"),
                                           (["0"], "0 must be 1 or more")])
def test_a_bad_size_gets_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("daq_layer_timing", argv)
