"""tools/dfsq_codes_timing.py: its table and search forms are the same codes, the one-byte
form stays within a byte, and bad arguments get argparse's error."""

from __future__ import annotations

import pytest
import torch


def test_table_and_thresholds_agree_and_u8_fits_a_byte(load_tool):
    tool = load_tool("dfsq_codes_timing")
    forms = tool.forms(tool.codes_modules(seed=3))
    x = torch.randn(2, tool.CHANNELS, 7, 5).contiguous(memory_format=torch.channels_last)
    table, thresholds = forms["grid table (gather)"](x), forms["search"](x)
    assert torch.equal(table, thresholds) and int(table.max()) > 255  # 11-bit codes
    one_byte = forms["search, one-byte codes"](x)
    assert one_byte.dtype == torch.uint8 and int(one_byte.max()) > 0


@pytest.mark.parametrize("argv, message", [(["abc"], "'abc' is not an integer"),
                                           (["8", "0"], "0 must be 1 or more"),
                                           (["--bits", "9"], "invalid choice: 9")])
def test_bad_arguments_get_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("dfsq_codes_timing", argv)


def test_more_bits_mean_more_points_and_the_search_still_agrees(load_tool):
    tool = load_tool("dfsq_codes_timing")
    modules = tool.codes_modules(seed=1, bits=5)
    assert modules["exact"].points.shape == (tool.CHANNELS, 32)
    forms = tool.forms(modules)
    x = torch.randn(1, tool.CHANNELS, 4, 4).contiguous(memory_format=torch.channels_last)
    assert torch.equal(forms["grid table (gather)"](x), forms["search"](x))


def test_a_concat_coded_piece_by_piece_gives_the_codes_of_the_whole(load_tool):
    tool = load_tool("dfsq_codes_timing")
    forms = tool.concat_forms(3)
    torch.manual_seed(0)  # a mean differing in its last bit could flip a code at a tie
    maps = [torch.randn(1, tool.CHANNELS, 5, 6).contiguous(memory_format=torch.channels_last)
            for _ in range(3)]
    whole, pieces = forms["concat, coded whole"](maps), forms["concat, coded piece by piece"](maps)
    assert whole[0].shape == (1, 3 * tool.CHANNELS, 5, 6) and whole[0].dtype == torch.uint8
    assert torch.equal(whole[0], pieces[0])
    torch.testing.assert_close(whole[1], pieces[1], rtol=1e-6, atol=0)  # the steps


def test_compiled_piece_by_piece_codes_equal_the_eager_whole(load_tool):
    """Under torch.compile the pieces take the midpoint search and chunked statistics
    (reduction_chunks: 128 positions → 2 chunks): still the table's codes of the concat."""
    tool = load_tool("dfsq_codes_timing")
    forms = tool.concat_forms(2)
    torch.manual_seed(0)
    maps = [torch.randn(1, tool.CHANNELS, 8, 16).contiguous(memory_format=torch.channels_last)
            for _ in range(2)]
    compiled = torch.compile(forms["concat, coded piece by piece"])
    with torch.no_grad():
        assert torch.equal(compiled(maps)[0], forms["concat, coded whole"](maps)[0])
