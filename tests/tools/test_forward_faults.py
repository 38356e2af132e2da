"""tools/forward_faults.py: its per-call counts are the process's minor page faults, and
its arguments are checked."""

from __future__ import annotations

import mmap
import platform

import pytest
import torch


@pytest.mark.skipif(platform.system() != "Linux", reason="ru_minflt counts Linux page faults")
def test_a_call_that_touches_fresh_pages_counts_their_faults(load_tool):
    tool = load_tool("forward_faults")
    kept = []

    def touch(x):  # a fresh anonymous 8 MiB mapping, written once per 4 KiB page: new pages
        block = mmap.mmap(-1, 8 * 2 ** 20)  # whatever malloc keeps (fxquant/heap.py may be on
        for offset in range(0, len(block), 4096):  # in this worker already)
            block[offset] = 1
        kept.append(block)

    ms, faults = tool.one_call(touch, torch.zeros(1))
    assert ms >= 0 and faults >= 1  # 2048 pages of 4 KiB, or a few huge pages where THP is on
    results = tool.measure({"nothing": lambda x: x}, torch.zeros(1), 3)
    assert results["nothing"][1] == 0


@pytest.mark.parametrize("argv, message", [(["--planes", "3"], "invalid choice: 3"),
                                           (["--size", "0"], "0 must be 1 or more")])
def test_bad_arguments_get_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("forward_faults", argv)
