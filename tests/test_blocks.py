"""Blocks of a quantized graph (fxquant.blocks): named after the model's own units, every
value a block reads comes from before it, and running the blocks one after another gives the
graph's output bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.blocks import block_graph, block_of_module, partition
from fxquant.graph import values_of

pytestmark = pytest.mark.usefixtures("one_thread")


class Unit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class GlobalSkip(nn.Module):
    """IMDN's shape: head, a Sequential of composite units, a conv, a global skip from the
    head's output to the end, and a Sequential(conv, PixelShuffle) tail."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(Unit(c), Unit(c))
        self.merge = nn.Conv2d(c, c, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(c, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        h = self.head(x)
        return self.tail(self.merge(self.body(h)) + h)


def chained(gm, blocks, x):
    """Run the blocks in order, each on the values the earlier ones produced."""
    values = {node: x for node in gm.graph.nodes if node.op == "placeholder"}
    for block in blocks:
        outs = block_graph(gm, block)(*(values[n] for n in block.inputs))
        values.update(zip(block.outputs, outs))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return values[output.args[0]]


def test_blocks_follow_the_models_units_and_chain_to_the_exact_output(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib)
    blocks = partition(gm, fxquant.trace(tiny_sr))
    assert [b.name for b in blocks] == ["head", "blocks.0", "blocks.1", "tail"]
    # the quantizer of a block's first conv is trained with that block, not the one before
    assert any("quantizer" in str(n.target) for n in blocks[1].nodes if n.op == "call_module")
    assert [n.name for n in blocks[1].inputs] == [blocks[0].outputs[0].name]
    assert blocks[-1].targets == [blocks[-1].outputs[0].name]  # the image itself
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(chained(gm, blocks, x), gm(x))


def test_a_global_skip_is_an_output_of_the_head_read_by_a_later_block():
    torch.manual_seed(0)
    model = GlobalSkip().eval()
    float_gm = fxquant.trace(model)
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = fxquant.compile(model, "minmax-w8a8", calib=calib)
    blocks = partition(gm, float_gm)
    assert [b.name for b in blocks] == ["head", "body.0", "body.1", "merge", "tail"]
    head_out = blocks[0].outputs[0]
    assert head_out in blocks[3].inputs  # the skip is added after merge's conv
    assert blocks[0].targets == ["head"]
    # every input of a block is produced by an earlier block or is the graph's input
    produced = {n for n in gm.graph.nodes if n.op == "placeholder"}
    for block in blocks:
        assert set(block.inputs) <= produced
        produced |= set(block.outputs)
    x = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(chained(gm, blocks, x), gm(x))
        # values_of stops at the named values: the float head's output, nothing after it
        head_only = values_of(float_gm, ["head"])
        assert torch.equal(head_only(x)[0], model.head(x))
        assert not any(n.op == "call_module" and n.target == "merge"
                       for n in head_only.graph.nodes)


def test_a_sequential_of_leaves_is_one_block_and_of_units_is_many():
    model = GlobalSkip()
    assert block_of_module(model, "tail.0") == "tail"
    assert block_of_module(model, "body.1.a") == "body.1"
    assert block_of_module(model, "head") == "head"


ZOO_BLOCKS = {
    "imdn": ["fea_conv", *(f"IMDB{i}" for i in range(1, 7)), "c", "LR_conv", "upsampler"],
    "pan": ["conv_first", *(f"SCPA_trunk.{i}" for i in range(16)), "trunk_conv", "upconv1",
            "att1", "HRconv1", "upconv2", "att2", "HRconv2", "conv_last"],
    "edsr_baseline": ["sub_mean", "head", *(f"body.{i}" for i in range(17)), "tail.0",
                      "tail.1", "add_mean"],
}


@pytest.mark.parametrize("name", sorted(ZOO_BLOCKS))
def test_zoo_models_split_into_their_published_units(name):
    """On the zoo's own graphs (random weights; conv outputs quantized too, so a head's
    quantized output is read both by the next block and by a later global skip)."""
    from fxquant.models import build_model

    torch.manual_seed(0)
    model = build_model(name, 4).eval()
    gm = fxquant.compile(model, "mse-w8a8-sym-all", calib=torch.rand(2, 3, 16, 16))
    blocks = partition(gm, fxquant.trace(model))
    assert [b.name for b in blocks] == ZOO_BLOCKS[name]
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(chained(gm, blocks, x), gm(x))
