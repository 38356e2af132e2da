"""tools/daq_bench_planes.py: its argument is checked before anything is built."""

from __future__ import annotations

import pytest


def test_daq_bench_planes_refuses_a_bad_round_count_before_building(load_tool, capsys):
    tool = load_tool("daq_bench_planes")
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["0"])
    assert exit_info.value.code == 2
    assert "0 must be 1 or more" in capsys.readouterr().err
