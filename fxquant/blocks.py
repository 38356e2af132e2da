"""The blocks of a traced model, for block-wise reconstruction (BRECQ, Li et al., ICLR 2021).

A block is a model's own building unit: a direct child of the model, or of a list of units
(an ``nn.Sequential`` or ``nn.ModuleList`` with composite children: PAN's ``SCPA_trunk`` holds
16 SCPA blocks, each is a block, and EDSR's ``body`` 16 residual blocks and a conv, each a
block; IMDN's ``upsampler = Sequential(conv, PixelShuffle)`` holds leaves only: it is one
block). A traced graph keeps the
module paths but not the container types, so a list is recognised by its children's names
(``0``, ``1``, ...).

Every node of the quantized graph is assigned to one block:

- a node of the float graph (its name is in the float copy): the block of the module with
  parameters that ran last before it, in execution order (an add, a concat or a ReLU module
  written after a block's last conv belongs to that block);
- a node the passes inserted (a quantizer): the block of its first user, so the quantizer that
  reads a block's input is trained with that block.

The blocks are the maximal runs of one owner in graph order, so every value a block reads
from outside comes from an earlier block (or the graph's input). A block's *outputs* are its
nodes read by later blocks or by the graph's output, each paired with the float value it
approximates (a quantizer's output: the value it quantizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn


@dataclass
class Block:
    name: str  # the module path that owns it, e.g. "SCPA_trunk.3"
    nodes: list[fx.Node] = field(default_factory=list)
    inputs: list[fx.Node] = field(default_factory=list)  # values read from outside, in order
    outputs: list[fx.Node] = field(default_factory=list)  # values read after the block
    targets: list[str] = field(default_factory=list)  # float-graph names of ``outputs``


def _is_list_of_units(module: nn.Module) -> bool:
    children = list(module.named_children())
    return bool(children) and all(name.isdigit() for name, _ in children) and any(
        any(True for _ in child.children()) for _, child in children)


def block_of_module(root: nn.Module, target: str) -> str:
    """The block a module path belongs to: descend from the root while the module is a
    list of units."""
    parts, module, depth = target.split("."), root, 0
    while depth < len(parts):
        module = getattr(module, parts[depth], None)
        depth += 1
        if module is None or not _is_list_of_units(module):
            break
    return ".".join(parts[:depth])


def _float_owners(float_gm: fx.GraphModule) -> dict[str, str]:
    owners, current, pending = {}, None, []
    for node in float_gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module" and any(True for _ in float_gm.get_submodule(
                str(node.target)).parameters()):  # an activation module stays in its block
            current = block_of_module(float_gm, str(node.target))
            for waiting in pending:  # nodes before the first module join the first block
                owners[waiting] = current
            pending = []
        if current is None:
            pending.append(node.name)
        else:
            owners[node.name] = current
    return owners


def partition(gm: fx.GraphModule, float_gm: fx.GraphModule) -> list[Block]:
    """The blocks of the quantized graph ``gm`` in graph order (module docstring)."""
    float_owner = _float_owners(float_gm)
    owner: dict[fx.Node, str] = {}
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.name in float_owner:
            owner[node] = float_owner[node.name]
        else:  # inserted by a pass: trained with its first user's block
            users = [u for u in node.users if u in owner]
            owner[node] = owner[min(users, key=position.__getitem__)] if users \
                else _last_float_owner(node, float_owner)
    blocks: list[Block] = []
    for node in gm.graph.nodes:
        if node not in owner:
            continue
        if not blocks or blocks[-1].name != owner[node]:
            blocks.append(Block(owner[node]))
        blocks[-1].nodes.append(node)
    for block in blocks:
        inside = set(block.nodes)
        for node in block.nodes:
            for arg in node.all_input_nodes:
                if arg not in inside and arg.op != "get_attr" and arg not in block.inputs:
                    block.inputs.append(arg)
        block.outputs = [n for n in block.nodes if any(u not in inside for u in n.users)]
        block.targets = [_float_source(n, float_owner) for n in block.outputs]
    return blocks


def _float_source(node: fx.Node, float_names) -> str:
    """The float value an inserted node approximates: its first input's, back to the float
    graph (a quantizer's output approximates the value it quantizes)."""
    while node.name not in float_names:
        if not node.all_input_nodes:
            raise ValueError(f"node {node.name!r} has no float counterpart")
        node = node.all_input_nodes[0]
    return node.name


def _last_float_owner(node: fx.Node, float_owner: dict[str, str]) -> str:
    """An inserted node no block reads (e.g. feeding only the output): its input's block."""
    return float_owner[_float_source(node, float_owner)]


def block_graph(gm: fx.GraphModule, block: Block) -> fx.GraphModule:
    """A GraphModule over ``gm``'s modules (training it trains ``gm``) that takes the block's
    inputs, in ``block.inputs`` order, and returns its outputs as a tuple."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(block.inputs):
        env[node] = graph.placeholder(f"in_{i}_{node.name}")
    for node in block.nodes:
        for arg in node.all_input_nodes:  # constants the block reads are copied, not inputs
            if arg.op == "get_attr" and arg not in env:
                env[arg] = graph.node_copy(arg, env.__getitem__)
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(tuple(env[n] for n in block.outputs))
    return fx.GraphModule(gm, graph)
