"""The lower pass's cpu rewrites change where work happens, never a value: a quantized concat
becomes a concat of uint8 codes, bit for bit the same model."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import fxquant
import fxquant.passes.lower as lower_pass
from fxquant.lower.compare import layer_agreement
from fxquant.lower.uniform_codes import IntegerQuantize

pytestmark = pytest.mark.usefixtures("one_thread")


class DistillBlock(nn.Module):
    """IMDN-like: a split after a leaky ReLU, three pieces concatenated into a 1×1 conv, a
    residual add."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fuse = nn.Conv2d(2 + 4 + 8, 8, 1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x):
        h = self.head(x)
        distilled, rest = torch.split(self.act(self.c1(h)), (2, 6), dim=1)
        out = torch.cat([distilled, self.c2(rest), h], dim=1)
        return self.tail(self.fuse(out) + h)


@pytest.mark.parametrize("recipe", ["mse-w8a8-sym", "mse-w8a8-sym-outputs"])
def test_quantized_concat_joins_codes_and_changes_no_value(calib, recipe, monkeypatch):
    torch.manual_seed(0)
    model = DistillBlock().eval()
    gm = fxquant.compile(model, recipe, calib=calib)
    lowered = fxquant.lowered_copy(gm, "cpu")
    (cat,) = [n for n in lowered.graph.nodes if n.target is torch.cat]
    # every piece arrives as uint8 codes: its own quantize step, or a conv that emits them
    for piece in cat.args[0]:
        module = lowered.get_submodule(piece.target)
        assert isinstance(module, IntegerQuantize) or getattr(module, "_out_scale", 0) > 0
    (reader,) = cat.users
    assert reader.target == "fuse"
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        out = lowered(x)
        monkeypatch.setattr(lower_pass, "quantize_cat_pieces", lambda gm: 0)
        plain = fxquant.lowered_copy(gm, "cpu")
        assert not any(isinstance(plain.get_submodule(p.target), IntegerQuantize)
                       for n in plain.graph.nodes if n.target is torch.cat for p in n.args[0]
                       if p.op == "call_module")
        assert torch.equal(out, plain(x))
        span = float(gm(x).max() - gm(x).min())
        assert float((out - gm(x)).abs().max()) < 2e-2 * span


class TwoShuffles(nn.Module):
    """A ×2 sub-pixel stage into a quantized conv (its conv emits uint8 codes), then a ×2
    sub-pixel tail whose float output is the model's output (IMDN's and PAN's last step)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(8, 4 * 4, 3, padding=1)
        self.mid = nn.Conv2d(4, 8, 3, padding=1)
        self.last = nn.Conv2d(8, 3 * 4, 3, padding=1)

    def forward(self, x):
        h = nn.functional.pixel_shuffle(torch.relu(self.up(self.head(x))), 2)
        return nn.functional.pixel_shuffle(self.last(self.mid(h)), 2)


class ShuffledTail(nn.Module):
    """EDSR's tail: two quantized ×2 sub-pixel convs, each read by its pixel shuffle alone."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.up1 = nn.Conv2d(8, 8 * 4, 3, padding=1)
        self.up2 = nn.Conv2d(8, 8 * 4, 3, padding=1)
        self.last = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = self.body(torch.relu(h)) + h
        h = nn.functional.pixel_shuffle(self.up1(h), 2)
        return self.last(nn.functional.pixel_shuffle(self.up2(h), 2))


@pytest.mark.parametrize("recipe", ["daq-w4a4", "dfsq-w4a4"])
def test_folded_convs_before_a_shuffle_are_phase_major_and_change_no_value(
        recipe, calib, monkeypatch, tmp_path):
    """DAQ's and DFSQ's per-image folded convs take the phase-major rewrite too: the same
    output bit for bit, the layers still follow fake-quant, and save/load round-trips."""
    from fxquant.lower.compare import daq_layer_agreement

    torch.manual_seed(0)
    model = ShuffledTail().eval()
    gm = fxquant.compile(model, recipe, calib=calib)
    lowered = fxquant.lowered_copy(gm, "cpu")
    shuffles = [n for n in lowered.graph.nodes
                if n.target is torch.ops.fxquant.pixel_shuffle_phase_major]
    assert [n.args[0].target for n in shuffles] == ["up1", "up2"]
    assert dict(lowered.fxquant_history)["lower{target=cpu}"]["phase_major_shuffles"] == 2
    x = torch.rand(2, 3, 7, 9)
    assert max(diff for _, diff, _ in daq_layer_agreement(gm, lowered, [x])) < 3e-4
    with torch.no_grad():
        out = lowered(x)
        monkeypatch.setattr(lower_pass, "phase_major_shuffles", lambda gm: 0)
        assert torch.equal(out, fxquant.lowered_copy(gm, "cpu")(x))
        monkeypatch.undo()
        fxquant.save(lowered, tmp_path / "m.fxq")
        assert torch.equal(fxquant.load(tmp_path / "m.fxq", model)(x), out)


def test_shuffled_conv_outputs_are_phase_major_and_change_no_value(calib, monkeypatch,
                                                                   tmp_path):
    torch.manual_seed(0)
    model = TwoShuffles().eval()
    gm = fxquant.compile(model, "mse-w8a8-sym-all", calib=calib)
    lowered = fxquant.lowered_copy(gm, "cpu")
    shuffles = [n for n in lowered.graph.nodes
                if n.target is torch.ops.fxquant.pixel_shuffle_phase_major]
    # both read a conv directly: up's fused uint8 codes, last's float output
    assert [n.args[0].target for n in shuffles] == ["up", "last"]
    assert lowered.get_submodule("up")._out_scale > 0
    assert dict(lowered.fxquant_history)["lower{target=cpu}"]["phase_major_shuffles"] == 2
    x = torch.rand(2, 3, 7, 9)
    # layer by layer against fake-quant, the permuted convs compared in their own order
    assert all(a.max_steps <= 1 for a in layer_agreement(gm, lowered, [x]))
    with torch.no_grad():
        out = lowered(x)
        assert out.shape == (2, 3, 28, 36)
        monkeypatch.setattr(lower_pass, "phase_major_shuffles", lambda gm: 0)
        plain = fxquant.lowered_copy(gm, "cpu")
        assert not any(n.target is torch.ops.fxquant.pixel_shuffle_phase_major
                       for n in plain.graph.nodes)
        assert torch.equal(out, plain(x))
        monkeypatch.undo()
        # saved and loaded: the pipeline rebuilds the same graph, the saved (permuted) state fits
        fxquant.save(lowered, tmp_path / "m.fxq")
        assert torch.equal(fxquant.load(tmp_path / "m.fxq", model)(x), out)


def _piece_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "piece_codes"]


def test_dfsq_concat_codes_are_made_where_each_piece_is(calib, monkeypatch, tmp_path):
    """DFSQ's codes of a concatenation are computed right after each piece's op (its channel
    range named in the call) and joined where the quantizer stood; the output is bit for bit
    the unhoisted model's, and a saved model loads with the same graph."""
    torch.manual_seed(0)
    fake = fxquant.compile(DistillBlock().eval(), "dfsq-w4a4", calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    pieces = _piece_nodes(lowered)
    for node in pieces:  # right after the op that makes the piece
        owner = node.prev
        assert owner.op == "get_attr" and owner.target == "fuse_input_codes"
        assert node.args[0] is owner and owner.prev is node.args[1]
    (join,) = [n for n in lowered.graph.nodes if n.target == "join_codes"]
    assert [(p.args[2], p.args[3]) for p in join.args[1]] == [(0, 2), (2, 6), (6, 14)]
    assert not any(n.op == "call_module" and n.target == "fuse_input_codes"
                   for n in lowered.graph.nodes)
    x = torch.rand(2, 3, 9, 11)
    monkeypatch.setattr(lower_pass, "hoist_subset_pieces", lambda gm: 0)
    plain = fxquant.lowered_copy(fake, "cpu")
    assert not _piece_nodes(plain)
    path = tmp_path / "hoisted.fxq"
    fxquant.save(lowered, path)
    monkeypatch.undo()
    loaded = fxquant.load(path, DistillBlock().eval())
    assert len(_piece_nodes(loaded)) == 3
    with torch.no_grad():
        out = lowered(x)
        assert torch.equal(out, plain(x))
        assert torch.equal(loaded(x), out)
    with pytest.raises(fxquant.FxquantError, match="has 3 channels, not 2"):
        lowered.get_submodule("fuse_input_codes").piece_codes(torch.rand(1, 3, 4, 4), 0, 2)
    # the per-layer check finds the conv behind the join (tools/daq_lower_check.py)
    from fxquant.lower.compare import daq_layer_agreement

    agreement = {name: diff for name, diff, _ in daq_layer_agreement(fake, lowered, [x])}
    assert set(agreement) == {"c1", "c2", "fuse"} and agreement["fuse"] < 1e-3


class PooledPiece(DistillBlock):
    """A concat piece made by an op whose channels the graph does not tell (a max pool)."""

    def forward(self, x):
        h = self.head(x)
        distilled, rest = torch.split(self.act(self.c1(h)), (2, 6), dim=1)
        pooled = nn.functional.max_pool2d(h, 3, 1, 1)
        return self.tail(self.fuse(torch.cat([distilled, self.c2(rest), pooled], 1)) + h)


def test_dfsq_pieces_of_unknown_width_are_not_hoisted(calib):
    fake = fxquant.compile(PooledPiece().eval(), "dfsq-w4a4", calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    assert not _piece_nodes(lowered)
    (codes,) = [n for n in lowered.graph.nodes
                if n.op == "call_module" and n.target == "fuse_input_codes"]
    assert isinstance(codes.args[0], list) and len(codes.args[0]) == 3
    with torch.no_grad():
        assert lowered(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)


class SharedActivation(DistillBlock):
    """The activation before the split is read by something else too (the residual)."""

    def forward(self, x):
        h = self.head(x)
        a = self.act(self.c1(h))
        distilled, rest = torch.split(a, (2, 6), dim=1)
        return self.tail(self.fuse(torch.cat([distilled, self.c2(rest), h], 1)) + a)


class PReLUSplit(DistillBlock):
    """A per-channel PReLU before the split: its weights follow the channels, so it stays."""

    def __init__(self):
        super().__init__()
        self.act = nn.PReLU(8)


def _split_inputs(lowered) -> list:
    return [n.args[0] for n in lowered.graph.nodes if n.target is torch.split]


@pytest.mark.parametrize("recipe", ["dfsq-w4a4", "mse-w8a8-sym"])
def test_split_comes_before_the_activation_and_changes_no_value(calib, recipe, monkeypatch):
    """``split(act(c1), ...)`` becomes ``act`` on each piece of ``split(c1, ...)``: the split
    reads the conv, each piece is followed by its own call of the activation, and the output
    is bit for bit the unrewritten model's."""
    torch.manual_seed(0)
    fake = fxquant.compile(DistillBlock().eval(), recipe, calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    (source,) = _split_inputs(lowered)
    assert source.op == "call_module" and source.target == "c1"
    pieces = [n for n in lowered.graph.nodes if n.target is operator.getitem
              and n.args[0].target is torch.split]
    assert len(pieces) == 2
    for piece in pieces:
        (applied,) = piece.users
        assert applied.op == "call_module" and applied.target == "act"
    monkeypatch.setattr(lower_pass, "split_before_activation", lambda gm: 0)
    plain = fxquant.lowered_copy(fake, "cpu")
    assert _split_inputs(plain)[0].target == "act"
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(lowered(x), plain(x))


@pytest.mark.parametrize("model_cls", [SharedActivation, PReLUSplit])
def test_split_stays_after_a_shared_or_per_channel_activation(calib, model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    fake = fxquant.compile(model, "mse-w8a8-sym", calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    (source,) = _split_inputs(lowered)
    assert source.op == "call_module" and source.target == "act"
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        span = float(model(x).max() - model(x).min())
        assert float((lowered(x) - model(x)).abs().max()) < 5e-2 * span


@pytest.mark.parametrize("recipe", ["dfsq-w4a4", "daq-w4a4"])
def test_folded_convs_take_their_fold_from_a_node_before_them(calib, recipe, monkeypatch,
                                                              tmp_path):
    """Each per-image folded conv reads its fold from a ``prepare`` node of its own (which
    lower{compile=true} compiles into the region before the conv); eager, the output is the
    unrewritten model's bit for bit, and a saved model rebuilds the same graph."""
    from fxquant.lower.folded import CpuDaqConv2d

    torch.manual_seed(0)
    fake = fxquant.compile(DistillBlock().eval(), recipe, calib=calib)
    lowered = fxquant.lowered_copy(fake, "cpu")
    convs = [n for n in lowered.graph.nodes
             if isinstance(lowered.get_submodule(n.target) if n.op == "call_module" else None,
                           CpuDaqConv2d)]
    assert convs
    for node in convs:
        codes, folded = node.args
        assert folded.op == "call_method" and folded.target == "prepare"
        assert folded.args[0].op == "get_attr" and folded.args[0].target == node.target
        assert folded.args[1] is codes
    # the lowered modules' own methods are integer machinery, not ops left in float
    float_ops = dict(lowered.fxquant_history)["lower{target=cpu}"]["float_ops"]
    assert not {"prepare", "piece_codes", "join_codes"} & set(float_ops.split(", "))
    monkeypatch.setattr(lower_pass, "fold_in_region", lambda gm: 0)
    plain = fxquant.lowered_copy(fake, "cpu")
    assert not [n for n in plain.graph.nodes if n.target == "prepare"]
    path = tmp_path / "folded.fxq"
    fxquant.save(lowered, path)
    monkeypatch.undo()
    loaded = fxquant.load(path, DistillBlock().eval())
    assert len([n for n in loaded.graph.nodes if n.target == "prepare"]) == len(convs)
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        out = lowered(x)
        assert torch.equal(out, plain(x))
        assert torch.equal(loaded(x), out)
