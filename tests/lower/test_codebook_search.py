"""The lowered I²NQ codes (fxquant/lower/codebook.py) under ``lower{compile=true}``: the
branch-free search of the buckets (fxquant/lower/search.py) gives the table's codes bit for
bit, ties and out-of-range values included, and the compiled model runs the search."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.lower import codebook, search
from fxquant.lower.codebook import CodebookQuantize
from fxquant.lower.search import codes_by_search, search_vectorizes
from fxquant.quant.grid_buckets import bucket_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(rows: int, levels: int, seed: int, duplicates: bool, scale: float = 0.03125,
            zero_point: int = 0) -> CodebookQuantize:
    """A codebook over ``levels`` sorted uint8 grid codes per row, built as
    ``from_quantizer`` builds it (some rows with repeated codes: snapping can merge levels)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randperm(256, generator=g)[:levels].sort().values
                         for _ in range(rows)])
    if duplicates:
        codes[0, 1] = codes[0, 0]
    module = CodebookQuantize(rows, levels, channels_last=False)
    with torch.no_grad():
        module.table.copy_(torch.gather(codes, 1, bucket_table(codes, 8)).to(torch.uint8))
        module.scale.fill_(scale)
        module.zero_point.fill_(zero_point)
    module._derive()
    return module


@settings(max_examples=40, deadline=None)
@given(rows=st.sampled_from([1, 3, 8]), bits=st.integers(1, 5), seed=st.integers(0, 10 ** 6),
       duplicates=st.booleans(), channels_last=st.booleans(),
       scale=st.floats(2 ** -10, 0.5, width=32), zero_point=st.integers(0, 255))
def test_the_search_gives_the_tables_codes_bit_for_bit(rows, bits, seed, duplicates,
                                                      channels_last, scale, zero_point):
    """The search of the input against the buckets' thresholds (no division) gives the
    table's codes: every half-step bucket edge and the floats on either side of it (a value
    whose quotient lands exactly on a midpoint goes to the lower level), values beyond the
    grid at both ends, and random values between."""
    levels = 2 ** bits
    module = _module(rows, levels, seed, duplicates and levels > 2, scale, zero_point)
    channels = 8
    half = module.scale / 2
    edges = (torch.arange(-4, 516, dtype=torch.float32) - 2 * zero_point) * half
    edges = torch.cat([torch.nextafter(edges, torch.tensor(-float("inf"))), edges,
                       torch.nextafter(edges, torch.tensor(float("inf"))), edges / half * half])
    g = torch.Generator().manual_seed(seed)
    spread = (torch.rand(2, channels, 40, edges.numel() // 40, generator=g) - 0.5) * 600 * half
    x = torch.cat([edges.view(1, 1, 40, -1).expand(1, channels, 40, -1), spread])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if rows > 1:  # a per-channel codebook has one row per channel
        x = x[:, :rows]
    by_table = module(x)
    by_search = codes_by_search(x, module.thresholds, module.level_codes, module.search_bits)
    assert torch.equal(by_search.to(torch.uint8), by_table)


def test_the_search_rows_are_derived_again_on_load():
    module = _module(3, 16, 7, duplicates=True)
    fresh = CodebookQuantize(3, 16, channels_last=False)
    fresh.load_state_dict(module.state_dict())
    assert set(module.state_dict()) == {"table", "scale", "zero_point"}
    assert torch.equal(fresh.thresholds, module.thresholds) and torch.equal(fresh.level_codes,
                                                                 module.level_codes)


def test_a_table_with_more_levels_than_the_module_holds_is_refused():
    module = _module(2, 16, 1, duplicates=False)
    small = CodebookQuantize(2, 4, channels_last=False)
    with pytest.raises(ValueError, match="codebook row 0 has 16 levels; the module holds at "
                                         "most 4"):
        small.load_state_dict(module.state_dict())


@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
def test_the_compiled_model_searches_and_equals_the_compiled_table(tiny_sr, calib, granularity,
                                                                   monkeypatch):
    """lower{target=cpu,compile=true} on an I²NQ model whose 8-channel maps fill whole
    vectors (8 float lanes, as with AVX2; set here, whatever this CPU has): the codes come
    from the search (it is traced), and the output equals, bit for bit, that of the same model
    compiled with the table's gather (Inductor's fused float ops move both from the eager
    model by float rounding alone)."""
    r = fxquant.load_preset("i2nq-w4a4")
    r.activations.granularity = granularity
    r.validate()
    fake = fxquant.compile(tiny_sr, r, calib=calib)
    calls = []

    def spy(*args):
        calls.append(args[-1])
        return codes_by_search(*args)

    monkeypatch.setattr(codebook, "codes_by_search", spy)
    monkeypatch.setattr(search, "float_lanes", lambda: 8)
    inputs = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
              for seed in range(2)]
    searched = fxquant.lowered_copy(fake, "cpu", compile=True)
    with torch.no_grad():
        outs = [searched(x) for x in inputs]  # compiled at the first call
    # traced for each of the four quantized convs' inputs (Dynamo may trace a frame twice)
    traced = len(calls)
    assert traced >= 4 and set(calls) == {4}  # 16 levels: a 4-bit search
    gathered = fxquant.lowered_copy(fake, "cpu", compile=True)
    for module in gathered.modules():
        if isinstance(module, CodebookQuantize):
            module.compiled_codes = "table"
    eager = fxquant.lowered_copy(fake, "cpu")
    with torch.no_grad():
        assert torch.equal(gathered(inputs[0]), outs[0])
        assert len(calls) == traced  # the table's compile did not search
        for x, out in zip(inputs, outs):
            assert torch.equal(out, gathered(x)) and torch.equal(out, searched(x))
            torch.testing.assert_close(out, eager(x), rtol=0, atol=1e-6)


def test_maps_that_leave_a_vector_tail_keep_the_table(tiny_sr, calib, monkeypatch):
    """With 16 float lanes (AVX-512) TinySR's 8-channel maps would run the search one value
    at a time: the compiled model gathers from the table there (search_vectorizes)."""
    fake = fxquant.compile(tiny_sr, "i2nq-w4a4", calib=calib)

    def refuse(*_args):
        raise AssertionError("the search was traced for maps that leave a vector tail")

    monkeypatch.setattr(codebook, "codes_by_search", refuse)
    monkeypatch.setattr(search, "float_lanes", lambda: 16)
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    eager = fxquant.lowered_copy(fake, "cpu")
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=1e-6)
    assert search_vectorizes(32, 16) and not search_vectorizes(40, 16) and search_vectorizes(40, 8)
