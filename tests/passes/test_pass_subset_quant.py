"""``subset-quant`` (the ``dfsq`` method): structure (golden), numerics, options."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import fxquant
from fxquant import Recipe, RecipeError, compile
from fxquant.inspect import graph_table
from fxquant.metrics import sqnr_db
from fxquant.observers import Observer
from fxquant.quant import QuantConv2d
from fxquant.quant.subset import SubsetQuantizer
from fxquant.quant.universal_set import universal_set

FAST = {"restarts": 2, "kmeans_iters": 20}


def dfsq(bits: int, **options) -> dict:
    return {"method": "dfsq", "weights": {"bits": bits}, "activations": {"bits": bits},
            "options": {**FAST, **options}}


@pytest.fixture
def probe():
    return torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))


def test_subset_quantize_structure(tiny_sr, calib, golden):
    gm = compile(tiny_sr, dfsq(4), calib=calib)
    golden("tiny_sr.subset-quant.txt", graph_table(gm))
    assert not any(isinstance(m, Observer) for m in gm.modules())
    quant_convs = sorted(n for n, m in gm.named_modules() if isinstance(m, QuantConv2d))
    assert quant_convs == ["blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2"]
    assert type(gm.get_submodule("head")) is nn.Conv2d
    u = universal_set()
    for m in gm.modules():
        if isinstance(m, SubsetQuantizer):
            assert m.points.shape == (8, 16) and torch.isin(m.points, u).all()
            assert (m.points == 0).any(1).all()  # the pinned centre
    info = dict(gm.fxquant_history)["subset-quant"]
    assert info["activation_quantizers"] == 4 and info["weight_quantizers"] == 4


@pytest.mark.parametrize("bits, floor_db", [(8, 40.0), (6, 33.0), (4, 25.0), (3, 20.0)])
def test_dfsq_output_sqnr_floor(tiny_sr, calib, probe, bits, floor_db):
    gm = compile(tiny_sr, dfsq(bits), calib=calib)
    with torch.no_grad():
        assert sqnr_db(tiny_sr(probe), gm(probe)) > floor_db


def test_dfsq_8bit_is_near_float_and_activations_cost_little(tiny_sr, calib, probe):
    with torch.no_grad():
        ref = tiny_sr(probe)
        a8 = compile(tiny_sr, dfsq(8), calib=calib, pipeline="trace,dfsq-observe,calibrate,"
                     "subset-quant{weights=false}")(probe)
        assert sqnr_db(ref, a8) > 45.0


def test_dfsq_4bit_beats_uniform_4bit(tiny_sr, calib, probe):
    with torch.no_grad():
        ref = tiny_sr(probe)
        ours = sqnr_db(ref, compile(tiny_sr, dfsq(4), calib=calib)(probe))
        uniform = sqnr_db(ref, compile(tiny_sr, "minmax-w4a4", calib=calib)(probe))
    assert ours > uniform


def test_presets_are_the_official_configuration():
    r = fxquant.load_preset("dfsq-w4a4")
    assert r.method == "dfsq" and r.weights.bits == 4 and r.activations.bits == 4
    assert r.weights.granularity == "per-channel" and r.weights.observer == "minmax"
    assert r.calibration.num_patches == 32 and r.calibration.patch_size == 48
    o = r.options
    assert (o.normalization, o.selection, o.restarts, o.kmeans_iters, o.kmeans_tol, o.pin_zero,
            o.universal_words, o.eps) == ("dynamic", "kmeans", 5, 100, 1e-3, True, 4, 1e-8)
    assert o.range_guard == 1.0  # fxquant's addition; the official recipe has none
    official = fxquant.load_preset("dfsq-official-w4a4")
    assert official.options.range_guard == 0.0
    assert dataclasses.replace(official.options, range_guard=1.0) == o
    for b in (8, 6, 3):
        assert fxquant.load_preset(f"dfsq-w{b}a{b}").activations.bits == b
    assert fxquant.load_preset("dfsq-static-w4a4").options.normalization == "static"


def test_range_guard_clamps_to_the_calibration_range(tiny_sr, calib):
    gm = compile(tiny_sr, dfsq(4, range_guard=1.0), calib=calib)
    q = gm.get_submodule("blocks_0_0_input_quantizer")
    head = tiny_sr.head(calib).detach()
    assert torch.allclose(q.guard_lo, head.amin((0, 2, 3))) and torch.allclose(q.guard_hi, head.amax((0, 2, 3)))
    assert q.describe()["guard"] is True
    big = torch.full((1, 8, 4, 4), 1e6)
    big[0, :, 0, 0] = -1e6
    clamped = torch.maximum(torch.minimum(big, q.guard_hi.view(1, -1, 1, 1)), q.guard_lo.view(1, -1, 1, 1))
    assert torch.equal(q(big), q(clamped))
    q.guard = False
    assert not torch.equal(q(big), q(clamped))
    wide = compile(tiny_sr, dfsq(4, range_guard=2.0), calib=calib).get_submodule("blocks_0_0_input_quantizer")
    assert torch.allclose(wide.guard_hi - wide.guard_lo, 2 * (q.guard_hi - q.guard_lo))


@pytest.mark.parametrize("key, value, message", [
    ("normalization", "sometimes", "choose one of dynamic, static"),
    ("selection", "greedy", "choose one of kmeans, exhaustive"),
    ("kmeans_init", "zeros", "choose one of k-means\\+\\+, sklearn, random"),
    ("restarts", 0, "must be >= 1"),
    ("memory_mb", 0, "must be > 0"),
    ("range_guard", 0.5, "use 0 \\(off\\) or a factor >= 1"),
    ("universal_exponents", [[0, 1]], "one list per word"),
    ("universal_words", 11, "word combinations; use at most 2\\^20"),
    ("colour", "red", "unknown key 'colour'"),
])
def test_bad_options_name_valid_choices(key, value, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict({"method": "dfsq", "options": {key: value}})


def test_too_many_points_for_the_universal_set(tiny_sr, calib):
    with pytest.raises(RecipeError, match="do not fit"):
        compile(tiny_sr, dfsq(4, universal_words=1), calib=calib)  # 7 values < 16


def test_exhaustive_selection_is_no_worse_than_kmeans(tiny_sr, calib):
    small = {"universal_words": 2}  # 29 values, C(28, 3) subsets with the pinned 0
    kms = compile(tiny_sr, dfsq(2, **small), calib=calib)
    exh = compile(tiny_sr, dfsq(2, selection="exhaustive", **small), calib=calib)
    k_info = dict(kms.fxquant_history)["subset-quant"]
    e_info = dict(exh.fxquant_history)["subset-quant"]
    assert e_info["selection"] == "exhaustive"
    assert e_info["mean_mse"] <= k_info["mean_mse"] + 1e-12
    with pytest.raises(RecipeError, match="exceeds the limit"):
        compile(tiny_sr, dfsq(4, selection="exhaustive"), calib=calib)


@pytest.mark.parametrize("options", [{}, {"normalization": "static", "range_guard": 1.0}])
def test_deterministic_and_save_load_round_trip(tiny_sr, calib, probe, tmp_path, options):
    a = compile(tiny_sr, dfsq(4, **options), calib=calib)
    b = compile(tiny_sr, dfsq(4, **options), calib=calib)
    for (na, ma), (nb, mb) in zip(a.named_buffers(), b.named_buffers()):
        assert na == nb and torch.equal(ma, mb)
    fxquant.save(a, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=type(tiny_sr)())
    with torch.no_grad():
        assert torch.equal(a(probe), loaded(probe))


def test_float_model_is_not_modified(tiny_sr, calib, probe):
    with torch.no_grad():
        before = tiny_sr(probe)
    compile(tiny_sr, dfsq(4, normalization="static"), calib=calib)
    with torch.no_grad():
        assert torch.equal(tiny_sr(probe), before)
