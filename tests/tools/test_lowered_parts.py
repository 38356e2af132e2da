"""tools/lowered_parts.py: it times every compiled region and folded conv of a lowered DFSQ
model without changing what the model computes, leaves nothing patched behind, and bad
arguments get argparse's error."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.output_code import CompiledFxGraph

import fxquant
from fxquant.cli_args import lowered_timing_options
from fxquant.lower.folded import CpuDaqConv2d

pytestmark = pytest.mark.usefixtures("one_thread")


def test_parts_count_every_folded_conv_and_region_and_change_no_output(load_tool, tiny_sr,
                                                                      calib):
    tool = load_tool("lowered_parts")
    fake = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib)
    options = lowered_timing_options(fake, 1, "u8")
    assert options == {"target": "cpu", "compile": True, "planes": 1, "subset_codes": "u8"}
    lowered = fxquant.lowered_copy(fake, **options)
    plain = fxquant.lowered_copy(fake, **options)
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    saved = (CompiledFxGraph.__call__, CpuDaqConv2d.forward, CpuDaqConv2d.image_conv)
    totals, parts = tool.measure(lowered, x, 3)
    assert (CompiledFxGraph.__call__, CpuDaqConv2d.forward, CpuDaqConv2d.image_conv) == saved
    convs = sum(isinstance(m, CpuDaqConv2d) for m in lowered.modules())
    assert convs > 0 and len(totals) == 3
    assert parts[tool.FOLDED][1] == parts[tool.INT8][1] == 3 * convs
    assert parts[tool.INT8][0] < parts[tool.FOLDED][0]  # the int8 conv runs inside the fold
    regions = [label for label in parts if label not in (tool.FOLDED, tool.INT8)]
    assert regions and all(parts[label][1] % 3 == 0 for label in regions)
    parts_sum = sum(seconds for label, (seconds, _) in parts.items() if label != tool.INT8)
    assert parts_sum <= sum(totals)
    table = tool.render(totals, parts, 3)
    assert "| the rest of the forward |" in table and f"| {convs} |" in table
    with torch.inference_mode():
        assert torch.equal(lowered(x), plain(x))


@pytest.mark.parametrize("argv, message", [
    (["imdn", "dfsq-w4a4", "--rounds", "0"], "0 must be 1 or more"),
    (["imdn", "dfsq-w4a4", "--subset-codes", "u4"], "invalid choice: 'u4'"),
    (["imdn"], "the following arguments are required: recipe")])
def test_bad_arguments_get_an_argparse_error(argparse_error, argv, message):
    assert message in argparse_error("lowered_parts", argv)
