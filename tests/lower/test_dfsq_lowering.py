"""DFSQ lowered (fxquant/lower/subset.py): the integer codes are exactly the fake-quant
points, each lowered conv follows its fake-quant conv, whole tiny models follow theirs on
both targets and survive save/load, and what cannot lower is named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.errors import PassError
from fxquant.lower.compare import daq_layer_agreement
from fxquant.lower.folded import CpuDaqConv2d, ReferenceDaqConv2d
from fxquant.lower.planes import code_values
from fxquant.lower.subset import SubsetQuantize
from fxquant.quant import Quantizer
from fxquant.quant.subset import SubsetQuantizer, grid_lookup, point_exponent
from fxquant.quant.universal_set import universal_set

pytestmark = pytest.mark.usefixtures("one_thread")

OFFICIAL = universal_set(4, [], True)  # 377 values on the 2^-10 grid


def random_quantizer(seed: int, channels: int, bits: int, post_relu: bool, mode: str,
                     guard: bool, multipliers: bool = False) -> SubsetQuantizer:
    g = torch.Generator().manual_seed(seed)
    q = SubsetQuantizer(bits, channels, post_relu=post_relu, mode=mode, guard=guard)
    pool = OFFICIAL[OFFICIAL >= 0] if post_relu else OFFICIAL
    picks = torch.stack([pool[torch.randperm(len(pool), generator=g)[:2 ** bits]]
                         for _ in range(channels)])
    q.set_points(picks)
    if mode == "static":
        q.set_scale(torch.rand(channels, generator=g) * 3 + 0.1)
    if guard:
        q.set_guard(torch.full((channels,), -2.0), torch.full((channels,), 1.5), 1.0)
    if multipliers:  # learned step multipliers (reconstruction)
        q.step_multiplier.copy_(torch.rand(channels, generator=g) * 1.5 + 0.5)
    return q


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.sampled_from([2, 3, 4]), st.booleans(),
       st.sampled_from(["dynamic", "static"]), st.booleans(), st.booleans(), st.booleans())
def test_codes_are_the_fake_quant_points(seed, channels, bits, post_relu, mode, guard,
                                         channels_last, multipliers):
    q = random_quantizer(seed, channels, bits, post_relu, mode, guard, multipliers)
    x = torch.randn(3, channels, 5, 4, generator=torch.Generator().manual_seed(seed)) * 2
    if post_relu:
        x = x.relu()
    module = SubsetQuantize.from_quantizer(q, channels_last)
    codes, step, offset, centre = module(x)
    _, _, mean = q._normalize(x)
    # the codes' expected value ĉ (charged by the cpu/gpu conv to its offset term): given in
    # dynamic mode, where Δ·ĉ + β is the mean the input was shifted by, or post-ReLU its mean
    assert (centre is not None) == (mode == "dynamic")
    if centre is not None:
        expect = mean if mean is not None else x.mean((2, 3), keepdim=True)
        value = step * centre  # + β: float32 rounding of the larger of the two terms
        torch.testing.assert_close(value + offset, expect.expand_as(offset), rtol=1e-5,
                                   atol=4e-7 * float(torch.maximum(value.abs(), offset.abs()).max()))
    if channels_last and module.max_code > 255:  # cpu: two uint8 planes lo + 256·hi
        assert [c.dtype for c in codes] == [torch.uint8] * 2
        assert all(c.is_contiguous(memory_format=torch.channels_last) for c in codes)
    levels = code_values(codes)
    assert levels.min() >= 0 and levels.max() <= module.max_code
    # the compiled path's threshold sums give the table's codes exactly, ties included
    on_mids = module.mids.t().reshape(1, channels, 1, -1)  # every value on a midpoint
    for probe in (q._normalize(x)[0], on_mids, on_mids * 3):
        by_table = grid_lookup(probe, module.lookup_exponent, module.table)
        assert torch.equal(module.codes_by_thresholds(probe), by_table)
    assert step.shape == offset.shape == (3, channels, 1, 1)
    with torch.no_grad():
        expected = q(x)
    # Δ·q + β is the fake-quant value up to float64-vs-float32 rounding of the de-normalization
    torch.testing.assert_close((step.double() * levels + offset.double()).float(), expected,
                               rtol=2e-6, atol=2e-6 * float(expected.abs().max()))
    # and the code is the rank of the point on the channel's own integer grid
    e = point_exponent(q.points)
    ints = (q.points.double() * 2 ** e).round()
    base = ints.min(1).values.view(1, -1, 1, 1)
    points = q.quantize_normalized(q._normalize(x)[0])
    torch.testing.assert_close((points.double() * 2 ** e - base) % 1, torch.zeros_like(base)
                               .expand_as(points), rtol=0, atol=0)


def test_official_points_need_eleven_bit_codes_and_small_sets_one_byte():
    q = SubsetQuantizer(4, 2)
    q.set_points(torch.stack([OFFICIAL[[0, 40, 100, 150, 188, 189, 190, 200, 220, 250, 270,
                                        300, 330, 350, 370, 376]],
                              torch.arange(16) / 1024.0]))
    module = SubsetQuantize.from_quantizer(q, False)
    assert module.point_exponent == 10 and module.max_code == 2048
    assert module.code_step.flatten().tolist() == [1.0, 1.0] and module.base.flatten()[1] == 0
    q.set_points(torch.stack([torch.arange(16) / 16.0, torch.arange(16) / 8.0 - 1]))
    small = SubsetQuantize.from_quantizer(q, False)
    assert small.max_code == 15  # gcd 64 (and 128) on the 2^-10 grid: one uint8 plane
    assert small(torch.randn(1, 2, 3, 3))[0].dtype == torch.uint8


@pytest.mark.parametrize("recipe", ["dfsq-w4a4", "dfsq-static-w4a4", "dfsq-w8a8"])
def test_lowered_dfsq_follows_fake_quant(recipe, tiny_sr, calib, tmp_path):
    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    x = calib[:3]
    with torch.no_grad():
        expected = fake(x)
    # per layer: float64 vs float32 rounding (reference), the folded weights' two int8
    # planes (cpu); whole model: plus codes flipped where float rounding crosses a midpoint
    for target, cls, per_layer, whole in (("reference", ReferenceDaqConv2d, 2e-6, 1e-3),
                                          ("cpu", CpuDaqConv2d, 3e-4, 2e-2)):
        lowered = fxquant.lowered_copy(fake, target)
        layers = [m for m in lowered.modules() if isinstance(m, cls)]
        assert layers and not any(isinstance(m, Quantizer)
                                  for m in lowered.modules())
        agreement = daq_layer_agreement(fake, lowered, [x])
        assert len(agreement) == len(layers)
        assert max(a[1] for a in agreement) < per_layer
        with torch.no_grad():
            out = lowered(x)
        rel = float((out - expected).abs().max() / expected.abs().max())
        assert rel < whole, f"{target}: {rel}"
        path = tmp_path / f"{recipe}-{target}.fxq"
        fxquant.save(lowered, path)
        again = fxquant.load(path, tiny_sr)
        with torch.no_grad():
            assert torch.equal(again(x), out)


def test_points_off_a_dyadic_grid_are_refused_by_name(tiny_sr, calib):
    fake = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib)
    quantizer = next(m for m in fake.modules() if isinstance(m, SubsetQuantizer))
    quantizer.set_points(torch.linspace(-1, 1, 16).expand_as(quantizer.points) / 3)
    with pytest.raises(PassError, match="not on a dyadic grid"):
        fxquant.lowered_copy(fake, "reference")


def test_the_u8_preset_lowers_to_one_uint8_plane(tiny_sr, calib):
    """dfsq-u8-w4a4's universal set lies on the 2^-6 grid: every code fits uint8, so the cpu
    conv reads one plane (the official set needs two)."""
    from fxquant.quant.universal_set import integer_codes

    recipe = fxquant.resolve_recipe("dfsq-u8-w4a4")
    codes, k = integer_codes(4, recipe.options.universal_exponents)
    assert k == 6 and int(codes.max() - codes.min()) == 128 and len(codes) == 95
    lowered = fxquant.lowered_copy(fxquant.compile(tiny_sr, recipe, calib=calib), "cpu")
    modules = [m for m in lowered.modules() if isinstance(m, SubsetQuantize)]
    assert modules and all(m.max_code <= 128 for m in modules)
    with torch.no_grad():
        packed = modules[0](torch.randn(1, modules[0].channels, 6, 6))
    assert isinstance(packed[0], torch.Tensor) and packed[0].dtype == torch.uint8


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.sampled_from([2, 3, 4]), st.booleans(),
       st.sampled_from(["dynamic", "static"]), st.booleans())
def test_u8_codes_move_each_point_by_at_most_half_a_level(seed, channels, bits, post_relu,
                                                          mode, channels_last):
    """``codes="u8"``: one uint8 plane; each value is the fake-quant point's, moved by at most
    half of its channel's u8 level; a channel whose exact codes fit a byte keeps them, and
    ĉ still gives the mean the input was shifted by."""
    q = random_quantizer(seed, channels, bits, post_relu, mode, guard=False)
    x = torch.randn(2, channels, 5, 4, generator=torch.Generator().manual_seed(seed)) * 2
    if post_relu:
        x = x.relu()
    exact = SubsetQuantize.from_quantizer(q, channels_last)
    u8 = SubsetQuantize.from_quantizer(q, channels_last, codes="u8")
    assert u8.max_code <= 255 and u8.table.dtype == torch.uint8
    codes, step, offset, centre = u8(x)
    assert isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8
    assert codes.is_contiguous(memory_format=torch.channels_last) or not channels_last
    with torch.no_grad():
        expected = q(x)
    value = step.double() * codes.double() + offset.double()
    tolerance = step.double() / 2 + 2e-6 * float(expected.abs().max())
    assert bool(((value - expected.double()).abs() <= tolerance).all())
    normalized = q._normalize(x)[0]
    assert torch.equal(u8.codes_by_thresholds(normalized),
                       grid_lookup(normalized, u8.lookup_exponent, u8.table))
    exact_codes, exact_step, _, exact_centre = exact(x)
    fits = (exact.code_step == u8.code_step).view(1, -1, 1, 1)
    assert bool(((code_values(exact_codes) == codes.double()) | ~fits).all())
    assert bool(((exact_step == step) | ~fits).all())
    # channels that re-grid span 255 levels, both ends exact
    span = u8.code_step * 255
    assert bool(((u8.code_step == exact.code_step) | (span > 255 * exact.code_step)).all())
    if centre is not None and exact_centre is not None:
        torch.testing.assert_close(step * centre, exact_step * exact_centre, rtol=1e-5,
                                   atol=1e-6 * float(offset.abs().max() + 1))


def test_u8_subset_codes_lower_whole_models_and_round_trip(tiny_sr, calib, tmp_path):
    fake = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib)
    x = calib[:2]
    with torch.no_grad():
        expected, exact = fake(x), fxquant.lowered_copy(fake, "cpu")(x)
    lowered = fxquant.lowered_copy(fake, "cpu", subset_codes="u8")
    modules = [m for m in lowered.modules() if isinstance(m, SubsetQuantize)]
    assert modules and all(m.codes == "u8" and m.max_code <= 255 for m in modules)
    assert any(m.max_code == 255 for m in modules)  # a re-gridded channel's top level
    with torch.no_grad():
        out = lowered(x)
    # one byte per code costs at most half a level per value: the model stays close to
    # the exact lowering, and not equal to it (the official set's codes need 11 bits)
    scale = float(expected.abs().max())
    assert float((out - expected).abs().max()) < 5e-2 * scale
    assert not torch.equal(out, exact)
    assert "subset_codes=u8" in lowered.fxquant_pipeline
    path = tmp_path / "u8.fxq"
    fxquant.save(lowered, path)
    with torch.no_grad():
        assert torch.equal(fxquant.load(path, tiny_sr)(x), out)


def test_unknown_subset_codes_are_refused_by_name():
    from fxquant.errors import RecipeError
    from fxquant.passes.lower import LowerPass

    with pytest.raises(RecipeError, match="subset_codes='u4'.*exact, u8"):
        LowerPass(target="cpu", subset_codes="u4")


@pytest.mark.parametrize("subset_codes", ["exact", "u8"])
def test_compiled_cpu_target_matches_eager(subset_codes, tiny_sr, calib, monkeypatch):
    """lower{target=cpu,compile=true}: under Inductor the codes come from threshold sums in
    place of the table (SubsetQuantize.codes_by_thresholds); the model follows the eager one
    up to rounding-boundary ties of Inductor's reductions (as for DAQ, seeded inputs). Eight
    float lanes (as with AVX2), so that TinySR's 8-channel maps take the search whatever this
    CPU's vectors (fxquant.lower.search.search_vectorizes; the modules read the lanes when built)."""
    from fxquant.lower import search

    monkeypatch.setattr(search, "float_lanes", lambda: 8)
    traced, by_search = [], SubsetQuantize.codes_by_thresholds
    monkeypatch.setattr(SubsetQuantize, "codes_by_thresholds",
                        lambda self, *a: traced.append(1) or by_search(self, *a))
    fake = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu", subset_codes=subset_codes)
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True, subset_codes=subset_codes)
    for seed in range(2):
        x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    assert traced


def test_compiled_codes_above_four_bits_keep_the_table(tiny_sr, calib, monkeypatch):
    """8-bit points would take 255 compares per value: the compiled path gathers from the
    table there (THRESHOLD_BITS), and still follows the eager model (up to codes flipped at
    rounding ties, which 8-bit steps meet more often, each costing less)."""
    from fxquant.lower.search import THRESHOLD_BITS

    fake = fxquant.compile(tiny_sr, "dfsq-w8a8", calib=calib)
    eager = fxquant.lowered_copy(fake, "cpu")
    assert {m.bits for m in eager.modules() if isinstance(m, SubsetQuantize)} == {8} \
        and THRESHOLD_BITS < 8

    def refuse(*_args):
        raise AssertionError("threshold sums used above THRESHOLD_BITS")

    monkeypatch.setattr(SubsetQuantize, "codes_by_thresholds", refuse)
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # 8-bit steps: codes at Inductor's rounding ties flip more often
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-3, atol=1e-3)


def test_folded_conv_options_on_a_model_without_them_warn(tiny_sr, calib, recwarn):
    """planes and subset_codes set DAQ's/DFSQ's folded convs: on a uniform model they change
    nothing, which the pass says; on a DFSQ model it does not."""
    uniform = fxquant.compile(tiny_sr, "minmax-w8a8", calib=calib)
    with pytest.warns(UserWarning, match="lower.planes=1 changes nothing here"):
        fxquant.lowered_copy(uniform, "cpu", planes=1)
    with pytest.warns(UserWarning, match="lower.subset_codes=u8 changes nothing here"):
        fxquant.lowered_copy(uniform, "cpu", subset_codes="u8")
    dfsq = fxquant.compile(tiny_sr, "dfsq-w4a4", calib=calib)
    recwarn.clear()
    fxquant.lowered_copy(dfsq, "cpu", planes=1, subset_codes="u8")
    assert not [w for w in recwarn if "changes nothing" in str(w.message)]
