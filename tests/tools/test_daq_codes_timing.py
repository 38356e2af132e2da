"""tools/daq_codes_timing.py: its two forms of the DAQ codes are the same numbers."""

from __future__ import annotations

import pytest
import torch


def test_stored_and_inlined_forms_agree_with_a_constant_channel(load_tool):
    tool = load_tool("daq_codes_timing")
    torch.manual_seed(0)
    x = torch.randn(2, 64, 9, 7).contiguous(memory_format=torch.channels_last)
    x[:, 20] = 0.25  # a channel with σ = 0: no step, its codes meet a zero step
    x[1, 40] *= 100  # one wide channel: image 1's others keep multiplier 1
    stored, inlined = tool.stored(x), tool.inlined(x)
    for a, b in zip(stored, inlined):
        assert torch.equal(a, b)
    q, step = stored[1], stored[2]
    assert q.dtype == torch.uint8 and int(q.max()) <= 128
    assert step[0, 4].item() == 0.0  # channel 20 of the input is channel 4 of the split
    assert int(q[0].max()) > 15  # similar steps: every channel's codes multiplied
    assert int(q[1, 24].max()) > 15 and int(q[1, :24].max()) <= 15


def test_bad_arguments_get_an_argparse_error(load_tool, capsys):
    tool = load_tool("daq_codes_timing")
    for argv in (["abc"], ["8", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'abc' is not an integer" in err and "0 must be 1 or more" in err

