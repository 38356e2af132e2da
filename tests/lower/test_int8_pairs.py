"""Exact int8 convs where oneDNN's u8 × s8 pairs saturate (CPUs without VNNI).

The detection is checked against what this CPU's oneDNN actually computes; the split path
is forced with ``FXQUANT_INT8_PAIRS=saturating`` so it runs, and must be exact, on every CPU.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.lower.compare import daq_layer_agreement, layer_agreement
from fxquant.lower.conv import CpuConv2d, ReferenceConv2d
from fxquant.lower.folded import CpuDaqConv2d
from fxquant.lower.int8_pairs import (
    OVERRIDE, int8_pairs_saturate, needs_split, split_weight_codes)


def onednn_conv(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's int8 conv with unit scales: its float32 output is the int32 accumulator."""
    out = weight.shape[0]
    packed = torch.ops.onednn.qconv_prepack(weight, torch.ones(out), 1.0, 0, [1, 1], [0, 0],
                                            [1, 1], 1, None)
    return torch.ops.onednn.qconv_pointwise(
        codes.contiguous(memory_format=torch.channels_last), 1.0, 0, packed, torch.ones(out),
        torch.zeros(out, dtype=torch.int64), None, [1, 1], [0, 0], [1, 1], 1, 1.0, 0,
        torch.float32, "none", [None], "")


def test_the_detection_matches_what_this_cpu_computes(monkeypatch):
    """255·127 + 255·127 = 64 770 overflows int16: a saturating CPU returns less, and the
    detection must say so exactly when it happens (both ways)."""
    monkeypatch.delenv(OVERRIDE, raising=False)
    codes = torch.full((1, 4, 1, 1), 255, dtype=torch.uint8)
    weight = torch.full((2, 4, 1, 1), 127, dtype=torch.int8)
    exact = 4 * 255 * 127
    assert (float(onednn_conv(codes, weight).max()) != exact) == int8_pairs_saturate()
    # split planes are exact whatever the CPU
    total = sum(onednn_conv(codes, part) for part in split_weight_codes(weight))
    assert float(total.max()) == exact


def test_the_override_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "saturating")
    assert int8_pairs_saturate()
    monkeypatch.setenv(OVERRIDE, "exact")
    assert not int8_pairs_saturate()
    monkeypatch.setenv(OVERRIDE, "maybe")
    with pytest.raises(ValueError, match="FXQUANT_INT8_PAIRS='maybe': use 'saturating', "
                                         "'exact' or leave it unset"):
        int8_pairs_saturate()


@given(st.lists(st.integers(-128, 127), min_size=1, max_size=64))
def test_split_planes_sum_to_the_codes_and_stay_within_64(values):
    k = torch.tensor(values, dtype=torch.int8)
    a, b = split_weight_codes(k)
    assert a.dtype == b.dtype == torch.int8
    assert torch.equal(a.long() + b.long(), k.long())
    assert int(a.long().abs().max()) <= 64 and int(b.long().abs().max()) <= 64


def test_only_codes_and_weights_that_can_saturate_are_split(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "saturating")
    full = torch.tensor([-128, 3], dtype=torch.int8)  # |−128| must not wrap to −128
    assert needs_split(255, full) and needs_split(128, full)
    assert not needs_split(15, full)  # 4-bit codes: 2·15·128 = 3 840
    assert not needs_split(255, torch.tensor([64, -64], dtype=torch.int8))
    monkeypatch.setenv(OVERRIDE, "exact")
    assert not needs_split(255, full)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 24), st.sampled_from([1, 3]), st.booleans())
def test_forced_split_cpu_conv_equals_the_reference_accumulator(seed, channels, kernel, relu):
    """Random 8-bit codes and weights, worst-case corners included: the split cpu conv is the
    reference's int32 accumulator, and its fused uint8 output is the reference's codes."""
    mp = pytest.MonkeyPatch()
    mp.setenv(OVERRIDE, "saturating")
    try:
        torch.manual_seed(seed)
        args = (channels, 5, (kernel, kernel), (1, 1), (kernel // 2,) * 2, (1, 1), 1, False, 8)
        ref = ReferenceConv2d(*args)
        ref.weight_codes.copy_(torch.randint(-128, 128, ref.weight_codes.shape))
        ref.weight_codes[0] = -128
        ref.weight_codes[1] = 127
        cpu = CpuConv2d(*args)
        cpu.load_state_dict(ref.state_dict(), strict=False)
        assert len(cpu._packed) == 2
        codes = torch.randint(0, 256, (2, channels, 7, 6), dtype=torch.uint8)
        codes[0] = 255
        assert torch.equal(cpu(codes).double(), ref(codes).double())  # < 2^24: exact in fp32
        quantize = fxquant.lower.IntegerQuantize(8, channels_last=True)
        quantize.load_state_dict({"scale": torch.tensor(1000.0),  # loading refreshes the
                                  "zero_point": torch.tensor(100)})  # forward's scalars
        cpu.fuse_output(quantize, relu)
        expected = quantize(torch.relu(ref(codes)) if relu else ref(codes))
        assert torch.equal(cpu(codes), expected)
    finally:
        mp.undo()


@pytest.mark.parametrize("recipe", ["minmax-w8a8", "mse-w8a8-sym-all", "dfsq-w4a4"])
def test_models_lowered_with_split_planes_follow_the_reference(recipe, tiny_sr, calib,
                                                              monkeypatch):
    """Whole tiny models through the forced split path: every layer within the agreement the
    unsplit path has (uniform: one output step; DFSQ's folded convs: their two weight planes)."""
    monkeypatch.setenv(OVERRIDE, "saturating")
    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    x = calib[:2]
    if recipe.startswith("dfsq"):
        assert any(isinstance(m, CpuDaqConv2d) for m in lowered.modules())
        assert max(a[1] for a in daq_layer_agreement(fake, lowered, [x])) < 3e-4
    else:
        convs = [m for m in lowered.modules() if isinstance(m, CpuConv2d)]
        assert convs and all(len(m._packed) == 2 for m in convs)
        assert all(a.max_steps <= 1 for a in layer_agreement(fake, lowered, [x]))


def test_a_saved_lowering_repacks_for_the_cpu_that_loads_it(tiny_sr, calib, tmp_path,
                                                            monkeypatch):
    """Saved on a CPU with VNNI (one plane), loaded on one without: the planes are packed
    again on load, for the loading CPU."""
    fake = fxquant.compile(tiny_sr, "mse-w8a8-sym", calib=calib)
    monkeypatch.setenv(OVERRIDE, "exact")
    path = tmp_path / "lowered.fxq"
    fxquant.save(fxquant.lowered_copy(fake, "cpu"), path)
    monkeypatch.setenv(OVERRIDE, "saturating")
    loaded = fxquant.load(path, model=type(tiny_sr)())
    convs = [m for m in loaded.modules() if isinstance(m, CpuConv2d)]
    assert convs and all(len(m._packed) == 2 for m in convs)
    assert all(a.max_steps <= 1 for a in layer_agreement(fake, loaded, [calib[:2]]))
