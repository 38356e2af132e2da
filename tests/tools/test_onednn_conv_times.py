"""tools/onednn_conv_times.py: oneDNN's verbose execution lines, parsed per conv shape."""

from __future__ import annotations

import torch

LINE = ("onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx512_core_vnni,"
        "forward_inference,src:u8::blocked:acdb::f0 wei:s8:a:blocked:AcdB64a4b::f0 "
        "bia:f32:a:blocked:a::f0 dst:u8::blocked:acdb::f0,attr-scratchpad:user,"
        "alg:convolution_direct,mb1_ic48oc64_ih128oh128kh3sh1dh0ph1_iw128ow128kw3sw1dw0pw1,"
        "{ms}")


def test_verbose_lines_are_grouped_by_conv_shape(load_tool):
    tool = load_tool("onednn_conv_times")
    text = "\n".join([LINE.format(ms=1.5), "onednn_verbose,v1,info,cpu,isa:avx512",
                      LINE.format(ms=0.5), LINE.format(ms=0.4),
                      "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,"
                      "src:s8::blocked:abcd::f0,,64x64x3x3,0.03",
                      LINE.replace("mb1_ic48oc64", "mb1_g2ic48oc64").format(ms=2.0),
                      LINE.replace(",convolution,", ",deconvolution,").format(ms=3.0)])
    times = tool.conv_times(text)
    assert times == {"48→64 3×3 @128×128": [1.5, 0.5, 0.4], "48→64 3×3 @128×128 g2": [2.0],
                     "deconv 48→64 3×3 @128×128": [3.0]}
    del times["deconv 48→64 3×3 @128×128"]
    table = tool.render({"lowered cpu": times, "pt2e_int8": {"48→64 3×3 @128×128": [1.0]}},
                        calls=1, title="t")
    assert "| 48→64 3×3 @128×128 | 3, 0.500 | 1, 1.000 |" in table
    assert "| 48→64 3×3 @128×128 g2 | 1, 2.000 | — |" in table
    # from the medians (3 calls × 0.5 + 1 × 2.0), not the sum of every call (4.4)
    assert "| **all convs, ms per forward (Σ calls × median)** | **3.50** | **1.00** |" in table


def test_a_real_int8_conv_is_captured_from_onednn(load_tool):
    """The capture of the C library's stdout sees oneDNN's own lines for a u8 × s8 conv."""
    tool = load_tool("onednn_conv_times")
    weight = torch.ones(8, 4, 3, 3, dtype=torch.int8)
    scales = torch.ones(8)
    packed = torch.ops.onednn.qconv_prepack(weight, scales, 1.0, 0, [1, 1], [1, 1], [1, 1], 1,
                                            None)
    codes = torch.ones(1, 4, 6, 7, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)

    def conv():
        return torch.ops.onednn.qconv_pointwise(
            codes, 1.0, 0, packed, scales, torch.zeros(8, dtype=torch.int64), None, [1, 1],
            [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [None], "")

    def other():
        return torch.ops.onednn.qconv_pointwise(
            codes[:, :, :5], 1.0, 0, packed, scales, torch.zeros(8, dtype=torch.int64), None,
            [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [None], "")

    texts = tool.verbose_runs({"a": conv, "b": other}, calls=3)
    times = {name: tool.conv_times(text) for name, text in texts.items()}
    # each function's lines go to its own record, however the calls interleave
    assert list(times["a"]) == ["4→8 3×3 @6×7"] and len(times["a"]["4→8 3×3 @6×7"]) == 3
    assert list(times["b"]) == ["4→8 3×3 @5×7"] and len(times["b"]["4→8 3×3 @5×7"]) == 3
    assert all(t > 0 for t in times["a"]["4→8 3×3 @6×7"])
