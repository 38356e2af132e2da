"""DAQ codes on the cpu target (fxquant/lower/daq.py). Balanced codes
(``balanced_multipliers``): each (image, channel) is handed as ``m·q`` with step ``Δ/m``; the
codes stay below the limit, hold the same values as the reference's, and make the one-plane
int8 requantization of the folded weights finer for the channels with small steps;
``lower{planes=1}`` selects that one plane. A quantized concat is coded piece by piece
(``dynamic_cat_pieces``), with the same result."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxquant
from fxquant.errors import RecipeError
from fxquant.lower.daq import DaqQuantize, balanced_multipliers
from fxquant.lower.folded import CpuDaqConv2d, ReferenceDaqConv2d, requantize_folded
from fxquant.lower.int8_pairs import needs_split
from fxquant.lower.subset import SubsetQuantize
from fxquant.quant import QuantConv2d
from fxquant.quant.daq import DAQActivationQuantizer
from fxquant.quant.daq_weights import DAQWeightQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

U32 = 2.0 ** -24


def daq_pair(seed: int, channels: int, bits, branch: str, spread: float, out_channels: int = 5):
    """A DAQ activation quantizer and 3×3 conv with DAQ weights; raw input whose channel
    scales span ``spread`` decades."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(channels, out_channels, 3, padding=1)
    act = DAQActivationQuantizer(channels, bits, branch=branch)
    qconv = QuantConv2d(conv, DAQWeightQuantizer(conv.weight.shape, 4, step_index="initial"))
    scales = 10.0 ** (-spread * torch.rand(1, channels, 1, 1))
    x = torch.randn(2, channels, 11, 9) * scales + 0.3 * scales * torch.randn(1, channels, 1, 1)
    return act, qconv, torch.relu(x) if branch != "signed" else x


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 9), st.integers(2, 8), st.booleans(),
       st.sampled_from(["signed", "relu-clipped"]), st.sampled_from([255, 128]),
       st.floats(0.0, 4.0))
def test_balanced_codes_stay_below_the_limit_and_hold_the_reference_values(
        seed, channels, bits, mixed, branch, limit, spread):
    """Codes ``m·q`` with ``1 <= m <= max(⌊limit/(2^b − 1)⌋, 1)`` (so ``m·q <= limit``
    unless the channel's own codes reach it: 8 bits against the 128 of a saturating CPU), and
    ``(Δ/m)·(m·q) + β = Δ·q + β`` up to the float32 rounding of ``Δ/m``."""
    per_channel = torch.randint(max(bits - 2, 2), bits + 1, (channels,))
    act, _, x = daq_pair(seed, channels, per_channel if mixed else bits, branch, spread)
    reference = DaqQuantize.from_quantizer(act, False)
    cpu = DaqQuantize.from_quantizer(act, True)
    cpu.code_limit = limit
    with torch.no_grad():
        q, step, offset, _ = reference(x)
        codes, balanced_step, balanced_offset, _ = cpu(x)
    top = 2.0 ** act.bits.view(1, -1, 1, 1).double() - 1
    assert codes.dtype == torch.uint8
    assert bool((codes.double() <= torch.clamp(top, min=limit)).all())
    m = torch.where(step > 0, step.double() / balanced_step.double(), torch.ones_like(top))
    assert bool(((m - m.round()).abs() <= 4 * U32 * m).all())
    m = m.round()
    assert bool((m >= 1).all()) and bool((m <= torch.clamp(torch.floor(limit / top), min=1)).all())
    assert torch.equal(codes.double(), q.double() * m)
    assert torch.equal(balanced_offset, offset)
    value, expected = balanced_step.double() * codes.double(), step.double() * q.double()
    assert bool(((value - expected).abs() <= 2 * U32 * expected.abs()).all())


def test_multipliers_follow_the_step_and_guard_empty_channels():
    step = torch.tensor([[1.0, 0.53, 0.06, 0.0], [2.0, 2.0, 0.2, 1.0]]).view(2, 4, 1, 1)
    m = balanced_multipliers(step, 15, 255)  # M = 17, per image
    assert m.flatten().tolist() == [17.0, 10.0, 2.0, 1.0, 17.0, 17.0, 2.0, 9.0]
    nan = balanced_multipliers(torch.tensor([float("nan"), 1.0]).view(1, 2, 1, 1), 15, 255)
    assert nan[0, 0].item() == 1.0  # the conv refuses a non-finite step; m stays finite
    per_channel = balanced_multipliers(step[:1, :2], torch.tensor([15.0, 255.0]).view(1, 2, 1, 1),
                                       255)
    assert per_channel.flatten().tolist() == [17.0, 1.0]  # an 8-bit channel has no headroom


def test_unclipped_relu_codes_are_not_balanced():
    """The unbounded post-ReLU branch keeps ``q`` (its codes may exceed 255 already)."""
    act, _, x = daq_pair(3, 4, 4, "relu", 2.0)
    cpu = DaqQuantize.from_quantizer(act, True)
    reference = DaqQuantize.from_quantizer(act, False)
    with torch.no_grad():
        codes, step, _, _ = cpu(x)
        q, ref_step, _, _ = reference(x)
    assert torch.equal(codes.double(), q.double()) and torch.equal(step, ref_step)


@pytest.mark.parametrize("seed", range(4))
def test_one_plane_error_is_within_the_balanced_bound_and_below_the_unbalanced(seed):
    """With one int8 weight plane each output differs from the reference by at most half an
    int8 step of its (image, output channel)'s folded weights ``Ŵ·Δ/m`` times the window sum
    of ``|m·q − ĉ|`` (the requantization error on the codes' expected value ĉ is charged to
    the offset term; plus float32 rounding); with channel scales spread over three decades its
    RMS is well below the unbalanced codes' (m = 1) and below the same conv without ĉ."""
    act, qconv, x = daq_pair(seed, 12, 4, "signed", 3.0, out_channels=6)
    codes_ref = DaqQuantize.from_quantizer(act, False)
    ref = ReferenceDaqConv2d.from_quantized(qconv)
    with torch.no_grad():
        expected = ref(codes_ref(x)).double()
        errors = {}
        for limit, centred in ((255, True), (0, True), (255, False)):
            codes = DaqQuantize.from_quantizer(act, True)
            codes.code_limit = limit
            cpu = CpuDaqConv2d.from_quantized(qconv)
            cpu.weight_planes = 1
            packed = codes(x)
            errors[limit, centred] = (cpu(packed if centred else (*packed[:3], None)).double()
                                      - expected).abs()
            if limit and centred:
                q, step, _, centre = packed
                _, wscale = requantize_folded(cpu.folded_weight(step.float(),
                                                                cpu.weight(torch.float32)))
                window = F.conv2d((q.double() - centre.double()).abs(),
                                  torch.ones(1, 12, 3, 3, dtype=torch.float64), None, 1, 1)
                tol = 0.5 * wscale.double().view(2, -1, 1, 1) * window \
                    + 1e-5 * expected.abs() + 1e-6
                assert bool((errors[limit, centred] <= tol).all())
    rms = {key: float(e.pow(2).mean().sqrt()) for key, e in errors.items()}
    assert rms[255, True] * 1.5 < rms[0, True]
    assert rms[255, True] * 1.5 < rms[255, False]


@pytest.mark.parametrize("planes", [1, 2])
def test_codes_equal_to_their_centre_give_the_reference_output(planes):
    """Where every code equals its channel's ĉ the requantization error is all on ĉ, which the
    offset term carries exactly (border included): the one- and two-plane outputs equal the
    reference's up to float32 rounding, and without ĉ they do not (one plane)."""
    torch.manual_seed(planes)
    conv = nn.Conv2d(6, 4, 3, padding=1)
    qconv = QuantConv2d(conv, DAQWeightQuantizer(conv.weight.shape, 4, step_index="initial"))
    ref = ReferenceDaqConv2d.from_quantized(qconv)
    cpu = CpuDaqConv2d.from_quantized(qconv)
    cpu.weight_planes = planes
    cpu.small_map = 0  # the int8 conv on this 7×5 map, not the float one of tiny maps
    centre = torch.randint(0, 200, (2, 6, 1, 1)).float()
    codes = centre.expand(2, 6, 7, 5).to(torch.uint8).contiguous(
        memory_format=torch.channels_last)
    step = 10.0 ** (-3 * torch.rand(2, 6, 1, 1))
    offset = torch.randn(2, 6, 1, 1)
    with torch.no_grad():
        expected = ref((codes, step, offset, None)).double()
        out = cpu((codes, step, offset, centre)).double()
        plain = cpu((codes, step, offset, None)).double()
    scale = float(expected.abs().max())
    assert float((out - expected).abs().max()) <= 1e-5 * scale
    if planes == 1:
        assert float((plain - expected).abs().max()) > 1e-4 * scale


def test_planes_option_reaches_every_folded_conv_and_survives_save_and_load(tiny_sr, calib,
                                                                            tmp_path):
    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)
    one = fxquant.lowered_copy(fake, "cpu", planes=1)
    assert one.fxquant_pipeline.endswith("lower{target=cpu,planes=1}")
    convs = [m for m in one.modules() if isinstance(m, CpuDaqConv2d)]
    assert len(convs) == 4 and {m.weight_planes for m in convs} == {1}
    fxquant.save(one, tmp_path / "one.fxq")
    torch.manual_seed(0)  # the tiny_sr fixture's weights
    back = fxquant.load(tmp_path / "one.fxq", model=type(tiny_sr)().eval())
    assert {m.weight_planes for m in back.modules() if isinstance(m, CpuDaqConv2d)} == {1}
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(back(x), one(x))
        two = fxquant.lowered_copy(fake, "cpu")(x)
    assert not torch.equal(two, one(x))  # the second plane is a different computation


@pytest.mark.parametrize("pipeline, message", [
    ("lower{target=cpu,planes=3}", "lower.planes=3: 2"),
    ("lower{target=reference,planes=1}", "applies to targets cpu and gpu only"),
])
def test_planes_option_refuses_what_it_cannot_do(pipeline, message):
    with pytest.raises(RecipeError, match=message):
        fxquant.parse_pipeline(pipeline)


def test_planes_option_refuses_a_bool_from_python(tiny_sr, calib):
    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)
    with pytest.raises(RecipeError, match="lower.planes=True: 2"):
        fxquant.lowered_copy(fake, "cpu", planes=True)


def test_where_int8_pairs_saturate_balanced_codes_stop_at_128_and_need_no_weight_split(
        monkeypatch):
    """On a CPU without VNNI a u8·s8 pair saturates int16 above 32 767; codes of at most 128
    keep every pair of int8 weights (|k| <= 127) below it, so balancing adds no split conv."""
    monkeypatch.setenv("FXQUANT_INT8_PAIRS", "saturating")
    act, qconv, x = daq_pair(5, 8, 4, "signed", 3.0)
    codes = DaqQuantize.from_quantizer(act, True)
    assert codes.code_limit == 128
    with torch.no_grad():
        q, step, _, _ = codes(x)
    assert int(q.max()) <= 128 and int(q.max()) > 15  # balanced, within the pair bound
    cpu = CpuDaqConv2d.from_quantized(qconv)
    wcodes, _ = requantize_folded(cpu.folded_weight(step.float(), cpu.weight(torch.float32)))
    assert not needs_split(int(q.max()), wcodes)


class CatNet(nn.Module):
    """A DAQ conv whose input is the channel concat of two branches (IMDN's fusion conv)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 4, 1)
        self.fuse = nn.Conv2d(12, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.head(x))
        return self.tail(torch.relu(self.fuse(torch.cat([self.left(h), self.right(h)], 1))))


def _recording(join, codes: dict, name: str):
    def recorded(parts):
        out = join(parts)
        codes[name] = out[0]
        return out
    return recorded


@pytest.mark.parametrize("recipe", ["daq-w4a4", "daq-mp4", "dfsq-w4a4", "dfsq-static-w4a4"])
def test_a_quantized_concat_is_coded_piece_by_piece_with_the_same_result(recipe, monkeypatch,
                                                                      tmp_path):
    """``lower{target=cpu}`` hands the concat's pieces to the DAQ or DFSQ codes module (no
    cat node left in front of it) and the lowered model's output is bit-identical to coding
    the concatenated tensor (DFSQ: the same codes; its per-channel mean, reduced over a piece
    instead of a slice of the concat, may differ in the last bit, and the output with it)."""
    import fxquant.passes.lower as lower_pass

    torch.manual_seed(0)
    model = CatNet().eval()
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    fake = fxquant.compile(model, recipe, calib=calib)
    pieces = fxquant.lowered_copy(fake, "cpu")
    codes = [n for n in pieces.graph.nodes
             if isinstance(pieces.get_submodule(n.target) if n.op == "call_module" else None,
                           (DaqQuantize, SubsetQuantize)) and isinstance(n.args[0], list)]
    # DFSQ's pieces are coded where they are made (hoist_subset_pieces), then joined
    joins = [n for n in pieces.graph.nodes if n.target == "join_codes"]
    assert len(codes + joins) == 1 and len((codes + joins)[0].args[-1]) == 2
    assert not any(n.target in (torch.cat, torch.concat) for n in pieces.graph.nodes)
    x = torch.rand(2, 3, 10, 9)
    path = tmp_path / "pieces.fxq"  # a saved lowered model is rebuilt with the pieces again
    fxquant.save(pieces, path)
    with torch.no_grad():
        assert torch.equal(fxquant.load(path, CatNet().eval())(x), pieces(x))
    monkeypatch.setattr(lower_pass, "dynamic_cat_pieces", lambda gm: 0)
    whole = fxquant.lowered_copy(fake, "cpu")
    assert any(n.target is torch.cat for n in whole.graph.nodes)
    codes = {}
    for name, model in (("pieces", pieces), ("whole", whole)):
        module = model.get_submodule("fuse_input_codes")
        if joins and name == "pieces":  # the joined codes, recorded as the join returns them
            module.join_codes = _recording(module.join_codes, codes, name)
        else:
            module.register_forward_hook(lambda m, i, out, name=name: codes.update({name: out[0]}))
    with torch.no_grad():
        a, b = pieces(x), whole(x)
    if recipe.startswith("daq"):
        assert torch.equal(a, b)
    else:
        assert len(codes["pieces"]) == 2  # the official set's codes: two uint8 planes
        assert all(torch.equal(p, w) for p, w in zip(codes["pieces"], codes["whole"]))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * float(b.abs().max()))
