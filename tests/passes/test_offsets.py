"""ODM's distribution offsets: ``inject-offsets`` chooses foldable, mismatched layers and
inserts identity offsets; ``fold-offsets`` folds trained ones into the producing convs so the
deployed graph has exactly plain QAT's nodes and the same outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.errors import PassError, RecipeError
from fxquant.quant.offsets import ChannelOffset, MismatchStats

QUANTIZED = "trace,observe,calibrate,quantize"


class Chain(nn.Module):
    """conv → ReLU → conv (foldable for a scale), conv → conv (foldable for a shift too), and
    a residual read twice (not foldable)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        y = self.b(torch.relu(self.a(h)))
        return self.tail(h + self.c(y))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Chain().eval()


def compiled(model, offsets="inject-offsets{threshold=0}", recipe="mse-w8a8"):
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return fxquant.compile(model, recipe, calib=calib, pipeline=f"{QUANTIZED},{offsets},verify")


def offsets_of(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, ChannelOffset)}


def test_offsets_go_only_where_they_fold_and_start_as_identity(model):
    plain = compiled(model, offsets="verify")
    gm = compiled(model)
    assert sorted(offsets_of(gm)) == ["b_input_offset", "c_input_offset"]
    x = torch.rand(2, 3, 10, 12)
    assert torch.equal(gm(x), plain(x))
    info = gm.fxquant_history[-2][1]
    assert info["offsets"] == 2 and info["candidates"] == 2


def test_a_value_read_twice_or_a_shift_through_relu_is_not_a_candidate(model):
    gm = compiled(model, offsets="inject-offsets{threshold=0,kind=shift}")
    # b's input is relu(a(h)): a shift does not pass the ReLU; c reads b's output directly
    assert sorted(offsets_of(gm)) == ["c_input_offset"]
    assert offsets_of(gm)["c_input_offset"].beta.requires_grad


def test_threshold_and_top_k_select_by_score(model):
    gm = compiled(model, offsets="inject-offsets{threshold=0,top_k=1}")
    assert len(offsets_of(gm)) == 1
    none = compiled(model, offsets="inject-offsets{threshold=1000}")
    assert offsets_of(none) == {}


def test_the_mismatch_score_measures_spread_across_images_relative_to_the_range():
    stats = MismatchStats()
    same = torch.rand(1, 2, 8, 8)
    stats.add(torch.cat([same, same]))
    assert stats.score(1.0) == 0.0  # identical images: no mismatch
    stats = MismatchStats()
    stats.add(torch.cat([torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 2.0)]))
    # means 0 and 2: std over images (unbiased) sqrt(2); stds both 0
    assert stats.score(4.0) == pytest.approx(2 ** 0.5 / 4)


@pytest.mark.parametrize("kind", ["scale", "both"])
def test_folding_trained_offsets_leaves_plain_nodes_and_the_same_outputs(model, kind):
    plain = compiled(model, offsets="verify")
    gm = compiled(model, offsets=f"inject-offsets{{threshold=0,kind={kind}}}")
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # as if trained: positive scales, some shift
        for offset in offsets_of(gm).values():
            offset.gamma.copy_(0.5 + torch.rand(offset.channels, generator=gen))
            if kind == "both":
                offset.beta.copy_(0.1 * torch.randn(offset.channels, generator=gen))
    folded = fxquant.transformed_copy(gm, "fold-offsets")
    assert offsets_of(folded) == {}
    assert [n.op for n in folded.graph.nodes] == [n.op for n in plain.graph.nodes]
    assert len(folded.graph.nodes) == len(plain.graph.nodes)
    x = torch.rand(2, 3, 10, 12, generator=gen)
    with torch.no_grad():
        ref, out = gm(x), folded(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert offsets_of(gm)  # the trained model itself is unchanged


def test_a_folded_model_saves_and_loads(model, tmp_path):
    gm = compiled(model)
    with torch.no_grad():
        for offset in offsets_of(gm).values():
            offset.gamma.fill_(1.5)
    folded = fxquant.transformed_copy(gm, "fold-offsets")
    fxquant.save(folded, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=Chain().eval())
    x = torch.rand(1, 3, 9, 9)
    assert torch.equal(loaded(x), folded(x))


def test_a_non_positive_scale_is_refused_by_name(model):
    gm = compiled(model)
    with torch.no_grad():
        offsets_of(gm)["b_input_offset"].gamma[3] = -0.2
    with pytest.raises(PassError, match=r"fold-offsets.*b_input_offset.*scale <= 0"):
        fxquant.transformed_copy(gm, "fold-offsets")


def test_bad_options_are_named():
    with pytest.raises(RecipeError, match="inject-offsets.kind: 'tilt'"):
        fxquant.parse_pipeline("inject-offsets{kind=tilt}")
    with pytest.raises(RecipeError, match="top_k = -1"):
        fxquant.parse_pipeline("inject-offsets{top_k=-1}")


def test_the_recorded_pipeline_names_the_sites_so_an_unfolded_model_reloads(model, tmp_path):
    gm = compiled(model)
    spec = gm.fxquant_pipeline.split(",inject-offsets{")[1].split("}")[0]
    assert "sites=b_input_quantizer;c_input_quantizer" in spec.split(",")
    with torch.no_grad():
        for offset in offsets_of(gm).values():
            offset.gamma.fill_(0.75)
    fxquant.save(gm, tmp_path / "trained.fxq")  # mid-training: offsets still in the graph
    loaded = fxquant.load(tmp_path / "trained.fxq", model=Chain().eval())
    assert sorted(offsets_of(loaded)) == sorted(offsets_of(gm))
    x = torch.rand(1, 3, 9, 9)
    assert torch.equal(loaded(x), gm(x))


def test_unknown_sites_are_named(model):
    with pytest.raises(fxquant.FxquantError, match=r"sites \['nope'\] are not foldable"):
        compiled(model, offsets="inject-offsets{sites=nope}")
