"""Graph queries and small edits shared by the passes: which nodes are convs, which are
selected by a recipe, and inserting a module call on a node's input."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import RecipeError
from fxquant.observers import Observer
from fxquant.quant import Quantizer
from fxquant.recipe import LayerConfig

OP_TYPE_MODULES: dict[str, tuple[type[nn.Module], ...]] = {
    "conv2d": (nn.Conv2d,),
    "conv_transpose2d": (nn.ConvTranspose2d,),
    "linear": (nn.Linear,),
}
CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)
# Set on the Conv2d that deconv-to-conv makes of a ConvTranspose2d: its op type stays
# conv_transpose2d, so layers.op_types selects it as the layer the user's model has.
FROM_TRANSPOSED = "fxquant_from_transposed"


# Names of the conv-output observers and quantizers (observe{outputs=true}): later passes
# (quantize, lower) and a saved model's rebuild tell them from input ones by these suffixes.
OUTPUT_OBSERVER, OUTPUT_QUANTIZER = "_output_observer", "_output_quantizer"


def with_outputs(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule over the same modules as ``gm`` (training it trains ``gm``) that returns
    ``(output, (value of node names[0], ...))``: intermediate values for feature losses."""
    return _returning(gm, names, keep_output=True)


def values_of(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A GraphModule over ``gm``'s modules that returns only the named values as a tuple:
    what follows them is not computed (e.g. a block's inputs, in block-wise reconstruction)."""
    return _returning(gm, names, keep_output=False)


def _returning(gm: fx.GraphModule, names: list[str], keep_output: bool) -> fx.GraphModule:
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, mapping)
    by_name = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise KeyError(f"no node named {missing[0]!r} in the graph")
    values = tuple(mapping[by_name[name]] for name in names)
    graph.output((output, values) if keep_output else values)
    result = fx.GraphModule(gm, graph)
    if not keep_output:  # dead-code elimination needs the owning module: impure modules stay
        result.graph.eliminate_dead_code()
        result.recompile()
    return result


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def method_owner(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module whose method ``node`` calls, ``owner.method(...)`` with the owner a
    ``get_attr`` (the lower pass's rewrites: ``prepare``, ``piece_codes``, ``join_codes``);
    None for any other node."""
    owner = node.args[0] if node.op == "call_method" and node.args else None
    if not isinstance(owner, fx.Node) or owner.op != "get_attr":
        return None
    return gm.get_submodule(owner.target)


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Every call of a conv or transposed-conv module, in graph (topological) order."""
    return [n for n in gm.graph.nodes if isinstance(module_of(gm, n), CONV_TYPES)]


def is_channel_affine(module: nn.Module) -> bool:
    """A 1×1 conv with a diagonal weight (e.g. EDSR's MeanShift): a fixed per-channel
    affine map rather than a learned feature layer."""
    if not isinstance(module, nn.Conv2d) or module.kernel_size != (1, 1) or module.groups != 1:
        return False
    if module.in_channels != module.out_channels:
        return False
    weight = module.weight.detach()[:, :, 0, 0]
    return bool((weight - torch.diag(torch.diagonal(weight)) == 0).all())


@dataclass(frozen=True)
class Selection:
    """The nodes a recipe quantizes, and why the others were left out."""

    nodes: tuple[fx.Node, ...]
    skipped: dict  # node name -> reason
    bits: dict = field(default_factory=dict)  # node name -> bits overriding the recipe's


def record_selection(state: dict, selected: int, skipped: dict) -> None:
    """What a layer-selecting pass chose, in the pass context's ``state``: compile names the
    rules when they left every layer out, and the method's later passes then have nothing to
    do (:func:`nothing_selected`) rather than an error of their own."""
    state["skipped_layers"] = skipped
    state["selected_layers"] = selected


def nothing_selected(state: dict) -> bool:
    """A layer-selecting pass ran and the recipe's layer rules left every layer out."""
    return state.get("selected_layers") == 0


# Ops that enlarge the feature map: the first one on the body's path starts the upsampling tail.
UPSAMPLING_MODULES = (nn.PixelShuffle, nn.Upsample, nn.ConvTranspose2d)
UPSAMPLING_FUNCTIONS = (F.pixel_shuffle, torch.pixel_shuffle, F.interpolate, F.upsample,
                        F.upsample_nearest, F.upsample_bilinear, F.conv_transpose2d)
# What may stand between a sub-pixel upsampler's conv and its pixel shuffle (CARN's ReLU).
PASS_THROUGH_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, Observer, Quantizer)
PASS_THROUGH_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu, F.prelu)


def _is_op(gm: fx.GraphModule, node: fx.Node, functions: tuple, modules: tuple) -> bool:
    """``node`` calls one of ``functions`` or one of the ``modules`` types."""
    if node.op == "call_function":
        return node.target in functions
    return isinstance(module_of(gm, node), modules)


def upsampling_tail(gm: fx.GraphModule) -> set[str]:
    """Names of the conv nodes of the upsampling tail (EDSR's ``tail``): every conv after the
    first upsampling op that follows a conv (a pixel shuffle, interpolation, upsample or
    transposed conv; an interpolation of the network's input, such as PAN's bilinear global
    skip, does not start it), and the conv of a sub-pixel upsampler, whose output a pixel
    shuffle rearranges (activations, observers or quantizers between them allowed)::

        x ─► conv_first ─► body ─► conv ─► pixel_shuffle ─► conv ─► pixel_shuffle ─► conv_last
                                   └────────────────── tail ──────────────────────────┘
    """
    after_conv: set[fx.Node] = set()
    start = None
    for node in gm.graph.nodes:
        if any(a in after_conv or isinstance(module_of(gm, a), CONV_TYPES)
               for a in node.all_input_nodes):
            after_conv.add(node)
        if start is None and node in after_conv and \
                _is_op(gm, node, UPSAMPLING_FUNCTIONS, UPSAMPLING_MODULES):
            start = node
    if start is None:
        return set()
    below, tail = {start}, set()
    for node in gm.graph.nodes:
        if node is not start and any(a in below for a in node.all_input_nodes):
            below.add(node)
        if node in below and pixel_shuffle_factor(gm, node) is not None:
            source = node.all_input_nodes[0]
            while source.all_input_nodes and \
                    _is_op(gm, source, PASS_THROUGH_FUNCTIONS, PASS_THROUGH_MODULES):
                source = source.all_input_nodes[0]
            if isinstance(module_of(gm, source), CONV_TYPES):
                tail.add(source.name)
    tail.update(n.name for n in below if isinstance(module_of(gm, n), CONV_TYPES))
    return tail


def select_layers(gm: fx.GraphModule, layers: LayerConfig) -> Selection:
    """Apply op types, include/exclude globs and the keep-first-last rule (with
    ``first_last_bits`` the first and last conv are chosen, at those bits); with
    ``tail_bits`` the convs of the upsampling tail (:func:`upsampling_tail`) other than a
    full-precision last conv take those bits."""
    wanted = tuple(t for op in layers.op_types for t in OP_TYPE_MODULES[op])
    convs = [n for n in conv_nodes(gm) if not is_channel_affine(module_of(gm, n))]
    edge = {convs[0].name, convs[-1].name} if layers.keep_first_last and convs else set()
    tail = upsampling_tail(gm) if layers.tail_bits else set()
    chosen, skipped, bits = [], {}, {}
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if module is None or not isinstance(module, wanted + CONV_TYPES):
            continue
        name = str(node.target)
        kind = nn.ConvTranspose2d if getattr(module, FROM_TRANSPOSED, False) else type(module)
        if not issubclass(kind, wanted):
            skipped[node.name] = f"op type {kind.__name__} not in layers.op_types"
        elif isinstance(module, nn.ConvTranspose2d):  # quantized as the conv deconv-to-conv makes
            skipped[node.name] = ("transposed conv kept float: the deconv-to-conv pass (after "
                                  "trace) converts those with groups 1, dilation 1, zero "
                                  "padding and equal strides")
        elif is_channel_affine(module):
            skipped[node.name] = "per-channel affine 1x1 conv (e.g. mean shift) kept full precision"
        elif node.name in edge and not layers.first_last_bits:
            skipped[node.name] = "first/last conv kept full precision (layers.keep_first_last)"
        elif not any(fnmatch.fnmatchcase(name, p) for p in layers.include):
            skipped[node.name] = "not matched by layers.include"
        elif any(fnmatch.fnmatchcase(name, p) for p in layers.exclude):
            skipped[node.name] = "matched by layers.exclude"
        else:
            chosen.append(node)
            if node.name in edge:
                bits[node.name] = layers.first_last_bits
            elif node.name in tail:
                bits[node.name] = layers.tail_bits
    return Selection(tuple(chosen), skipped, bits)


def input_bits(layer_bits: dict[str, int], consumers, default: int) -> int:
    """The width of an activation quantizer read by ``consumers`` (nodes): the widest of
    their own widths in ``layer_bits`` (:attr:`Selection.bits`: first_last_bits,
    tail_bits), ``default`` for the others."""
    return max((layer_bits.get(c.name, default) for c in consumers), default=default)


def refuse_bit_overrides(selection: Selection, method: str) -> None:
    """Methods whose quantizers take one recipe-wide bit-width refuse ``first_last_bits`` and
    ``tail_bits`` instead of quantizing those layers at the body's width unasked."""
    if selection.bits:
        raise RecipeError(f"{method} quantizes every selected layer at the recipe's bit-widths; "
                          "layers.first_last_bits and layers.tail_bits apply to the quantize "
                          "and nonuniform-quant pipelines: set them to 0, or exclude those "
                          f"layers ({', '.join(sorted(selection.bits))}) with layers.exclude")


def unique_attr_name(gm: fx.GraphModule, base: str) -> str:
    base = re.sub(r"\W", "_", base)
    name, index = base, 1
    while hasattr(gm, name):
        name = f"{base}_{index}"
        index += 1
    return name


def insert_input_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module,
                        suffix: str) -> fx.Node:
    """Route ``node``'s first argument through a new ``call_module`` of ``module``.

    Only this consumer sees the new node: other users of the same value are untouched,
    so every quantized layer has its own input quantizer.
    """
    name = unique_attr_name(gm, f"{node.name}_{suffix}")
    gm.add_submodule(name, module)
    source = node.args[0]
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (source,))
    node.update_arg(0, new)
    return new


def insert_shared_input_module(gm: fx.GraphModule, nodes: list[fx.Node], module: nn.Module,
                               suffix: str) -> fx.Node:
    """Route the common first argument of ``nodes`` through one new ``call_module`` of
    ``module`` that all of them read (one quantizer per produced tensor). A single node gets
    ``<node>_<suffix>`` as before; a value read by several gets ``<value>_shared_<suffix>``."""
    if len(nodes) == 1:
        return insert_input_module(gm, nodes[0], module, suffix)
    source = nodes[0].args[0]
    name = unique_attr_name(gm, f"{source.name}_shared_{suffix}")
    gm.add_submodule(name, module)
    first = min(nodes, key=lambda n: _position(gm, n))
    with gm.graph.inserting_before(first):
        new = gm.graph.call_module(name, (source,))
    for node in nodes:
        node.update_arg(0, new)
    return new


def insert_output_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module,
                         suffix: str) -> fx.Node:
    """Route every reader of ``node``'s value through one new ``call_module`` of ``module``,
    registered as ``<node>_<suffix>``."""
    name = unique_attr_name(gm, f"{node.name}_{suffix}")
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, n in enumerate(gm.graph.nodes) if n is node)


def replace_module_node(gm: fx.GraphModule, node: fx.Node, module: nn.Module,
                        name: str) -> fx.Node:
    """Replace ``call_module`` node ``node`` by a call of ``module``, registered as ``name``
    (the new node is named after it); the old submodule goes once nothing calls it."""
    old = node.target
    shared = any(n is not node and n.op == "call_module" and n.target == old for n in gm.graph.nodes)
    if name == old and not shared:
        gm.delete_submodule(old)  # the replacement takes over its name
    name = unique_attr_name(gm, name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, node.args, node.kwargs)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    if not any(n.op == "call_module" and n.target == old for n in gm.graph.nodes):
        gm.delete_submodule(old)
    return new


# Ops after which a value is >= 0 whatever their input.
_NONNEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid)
_NONNEGATIVE_FUNCTIONS = {"relu", "relu_", "relu6", "sigmoid", "softmax", "hardsigmoid", "abs"}
# Ops that keep a value >= 0 when all their tensor inputs are.
_PRESERVING_MODULES = (nn.PixelShuffle, nn.PixelUnshuffle, nn.MaxPool2d, nn.AvgPool2d,
                       nn.AdaptiveAvgPool2d, nn.Upsample, nn.Identity, nn.Dropout, nn.Flatten)
_PRESERVING_FUNCTIONS = {"pixel_shuffle", "pixel_unshuffle", "cat", "concat", "max_pool2d",
                         "avg_pool2d", "adaptive_avg_pool2d", "interpolate", "upsample",
                         "flatten", "reshape", "view", "contiguous", "clone", "add", "mul",
                         "getitem", "chunk", "split", "permute", "transpose", "pad"}


def is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` is a ReLU (module, function or method; not in place)."""
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    if node.op == "call_method":
        return node.target == "relu"
    return isinstance(module_of(gm, node), nn.ReLU)


def pixel_shuffle_factor(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The upscale factor when ``node`` is a pixel shuffle (module or function), else None."""
    if node.op == "call_function" and node.target in (F.pixel_shuffle, torch.pixel_shuffle):
        return node.args[1] if len(node.args) > 1 else node.kwargs["upscale_factor"]
    module = module_of(gm, node)
    return module.upscale_factor if isinstance(module, nn.PixelShuffle) else None


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def produces_nonnegative(gm: fx.GraphModule, node: fx.Node, _depth: int = 0) -> bool:
    """True when ``node``'s value is provably >= 0 from the graph (e.g. a post-ReLU input).

    DAQ's and DFSQ's post-ReLU quantizer branches use this instead of hand-set flags:
    ReLU-like ops make a value non-negative; pixel shuffle, pooling, concatenation,
    interpolation, addition and multiplication keep it non-negative when all inputs are.
    """
    if _depth > 64:
        return False
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _NONNEGATIVE_MODULES):
            return True
        if not isinstance(module, _PRESERVING_MODULES) and not getattr(module, "preserves_sign", False):
            return False
    elif node.op in ("call_function", "call_method"):
        name = _op_name(node)
        if name in _NONNEGATIVE_FUNCTIONS:
            return True
        if name not in _PRESERVING_FUNCTIONS:
            return False
        if name in ("add", "mul") and any(isinstance(a, (int, float)) and a < 0 for a in node.args):
            return False
    else:
        return False
    inputs = node.all_input_nodes
    return bool(inputs) and all(produces_nonnegative(gm, n, _depth + 1) for n in inputs)
