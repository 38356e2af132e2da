"""``fold-channel-norm``: structure (golden), float equivalence of every fold, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant.passes.fold_channel_norm as fold_module
from fxquant import PassContext, PassError, PassManager, Recipe, compile
from fxquant.inspect import graph_table
from fxquant.metrics import sqnr_db
from fxquant.quant import quant_mode
from fxquant.quant.subset import SubsetQuantizer

STATIC = {"method": "dfsq", "weights": {"bits": 4}, "activations": {"bits": 4},
          "options": {"normalization": "static", "restarts": 2, "kmeans_iters": 20}}
FLOAT_PIPELINE = ("trace,dfsq-observe,calibrate,subset-quant{weights=false},"
                  "fold-channel-norm")


class ResidualNet(nn.Module):
    """conv → relu whose output also feeds a residual add, and a conv shared by two calls."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.c3 = nn.Conv2d(c, c, 1)
        self.act = nn.LeakyReLU(0.1)
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        r = self.relu(self.c1(self.head(x)))
        y = self.c2(r) + r  # r feeds c2 and the add: c2's pre scale cannot go into c1
        z = self.act(self.c3(y))  # c3 → leaky relu → shared: foldable chain, but...
        z = self.shared(self.shared(z))  # ...shared is called twice: no fold into it
        return self.tail(z)


def float_error(gm, model, x) -> float:
    with torch.no_grad(), quant_mode(gm, "off"):
        out, ref = gm(x), model(x)
    return float((out - ref).abs().max() / ref.abs().max())


def test_fold_structure(tiny_sr, calib, golden):
    gm = compile(tiny_sr, STATIC, calib=calib)
    golden("tiny_sr.fold-channel-norm.txt", graph_table(gm))
    info = dict(gm.fxquant_history)["fold-channel-norm"]
    assert info["static_quantizers"] == 4
    assert (info["pre_folded"], info["pre_refused"], info["post_folded"], info["post_refused"]) == (2, 2, 4, 0)
    assert info["max_rel_error"] < 1e-5
    folded = {n: m.folded for n, m in gm.named_modules() if isinstance(m, SubsetQuantizer)}
    assert folded == {"blocks_0_0_input_quantizer": "post", "blocks_0_2_input_quantizer": "pre+post",
                      "blocks_1_0_input_quantizer": "post", "blocks_1_2_input_quantizer": "pre+post"}


def test_every_fold_keeps_the_float_output_of_tiny_sr(tiny_sr, calib):
    ctx = PassContext(Recipe.from_dict(STATIC), calib=calib)
    gm = PassManager(FLOAT_PIPELINE).run(tiny_sr, ctx)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert float_error(gm, tiny_sr, x) < 1e-5
    report = ctx.state["fold-channel-norm"]
    assert report["blocks_0_2_input_quantizer"]["pre"] == "folded into blocks.0.0 (output channels)"
    assert report["blocks_0_2_input_quantizer"]["post"] == "folded into blocks.0.2 (input channels)"
    assert report["blocks_0_0_input_quantizer"]["pre"].startswith("refused: head also feeds add")
    # the folds really moved the scales: the producer's weights changed, the model's did not
    assert not torch.equal(gm.get_submodule("blocks.0.0").weight, tiny_sr.blocks[0][0].weight)


def test_residual_and_shared_convs_are_refused_and_reported():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    calib = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    ctx = PassContext(Recipe.from_dict(STATIC), calib=calib)
    gm = PassManager(FLOAT_PIPELINE).run(model, ctx)
    report = ctx.state["fold-channel-norm"]
    assert report["c2_input_quantizer"]["pre"] == "refused: relu also feeds add (e.g. a residual add)"
    assert report["c2_input_quantizer"]["post"] == "folded into c2 (input channels)"
    assert report["c1_input_quantizer"]["pre"] == "folded into head (output channels)"
    assert report["shared_input_quantizer"]["pre"] == "folded into c3 (output channels)"
    assert report["shared_input_quantizer"]["post"] == \
        "refused: conv module 'shared' is called 2 times (shared weights)"
    assert report["shared_1_input_quantizer"]["pre"] == \
        "refused: conv module 'shared' is called 2 times (shared weights)"
    assert report["c3_input_quantizer"]["pre"].startswith("refused: input comes from add")
    info = ctx.history[-1][1]
    assert info["pre_refused"] == 3 and info["post_refused"] == 2
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    assert float_error(gm, model, x) < 1e-5
    # an unfolded scale stays a float multiply inside the quantizer
    assert not bool((gm.get_submodule("c2_input_quantizer").pre == 1).all())


def test_folded_quantized_model_stays_accurate(tiny_sr, calib):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    unfolded = compile(tiny_sr, STATIC, calib=calib,
                       pipeline="trace,dfsq-observe,calibrate,subset-quant,verify")
    folded = compile(tiny_sr, STATIC, calib=calib)
    with torch.no_grad():
        ref = tiny_sr(x)
        assert sqnr_db(ref, folded(x)) > 25.0
        assert abs(sqnr_db(ref, folded(x)) - sqnr_db(ref, unfolded(x))) < 3.0


def test_a_wrong_fold_is_caught(tiny_sr, calib, monkeypatch):
    real = fold_module.fold_input_scale
    monkeypatch.setattr(fold_module, "fold_input_scale", lambda conv, f: real(conv, f * 1.01))
    with pytest.raises(PassError, match="changed the float output"):
        compile(tiny_sr, STATIC, calib=calib)


def test_dynamic_quantizers_are_skipped(tiny_sr, calib):
    gm = compile(tiny_sr, {**STATIC, "options": {"restarts": 1, "kmeans_iters": 5}}, calib=calib)
    info = dict(gm.fxquant_history)["fold-channel-norm"]
    assert info["dynamic_skipped"] == 4 and info["static_quantizers"] == 0


def test_folds_with_a_range_guard_keep_the_float_output(tiny_sr, calib):
    recipe = {**STATIC, "options": {**STATIC["options"], "range_guard": 1.0}}
    ctx = PassContext(Recipe.from_dict(recipe), calib=calib)
    gm = PassManager(FLOAT_PIPELINE).run(tiny_sr, ctx)
    assert ctx.history[-1][1]["pre_folded"] == 2
    q = gm.get_submodule("blocks_0_2_input_quantizer")
    relu_out = torch.relu(tiny_sr.blocks[0][0](tiny_sr.head(calib))).detach()
    scale = relu_out.abs().amax((0, 2, 3)) + 1e-8
    assert torch.allclose(q.guard_hi, relu_out.amax((0, 2, 3)) / scale, atol=1e-6)  # moved with pre
    assert float_error(gm, tiny_sr, calib[:4]) < 1e-5


class SplitNet(nn.Module):
    """IMDN-style distillation: conv → LeakyReLU → split; one slice goes to a quantized conv."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.LeakyReLU(0.05)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fuse = nn.Conv2d(10, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        kept, rest = torch.split(self.act(self.c1(h)), (2, 6), dim=1)
        return self.tail(self.fuse(torch.cat([kept, self.c2(rest)], dim=1)))


def test_split_slices_fold_into_their_output_channels_only():
    torch.manual_seed(0)
    model = SplitNet().eval()
    calib = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    ctx = PassContext(Recipe.from_dict(STATIC), calib=calib)
    gm = PassManager(FLOAT_PIPELINE).run(model, ctx)
    report = ctx.state["fold-channel-norm"]
    assert report["c2_input_quantizer"]["pre"] == "folded into c1 (output channels 2..7)"
    assert report["fuse_input_quantizer"]["pre"].startswith("refused: input comes from cat")
    assert gm.get_submodule("c2_input_quantizer").folded == "pre+post"
    # rows 0..1 (the kept slice) only carry c1's own input scales; rows 2..7 also 1/s of c2
    ratio = gm.get_submodule("c1").weight / model.c1.weight
    post = gm.get_submodule("c1_input_quantizer")
    assert post.folded == "pre+post"  # head feeds only c1: both of c1's scales folded too
    assert not torch.allclose(ratio[2:, :, 0, 0] / ratio[:1, :, 0, 0], torch.ones(6, 8))
    assert torch.allclose(ratio[1], ratio[0], rtol=1e-5)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(4))
    assert float_error(gm, model, x) < 1e-5
