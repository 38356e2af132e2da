"""Graph helpers for folding per-channel scales into neighbouring convs, shared by the
``fold-channel-norm`` and ``equalize`` passes: where a scale can go (the producer conv through
positively homogeneous ops, the consumer conv), putting a folded copy in place, and checking
that a fold left the float output unchanged."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxquant.calibration import as_batches
from fxquant.pipeline import PassContext
from fxquant.quant import QuantConv2d, quant_mode
from fxquant.quant.fitting import weight_quantizer

_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {"relu", "leaky_relu"}
_FOLDABLE_CONVS = (nn.Conv2d,)


def describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
    return f"{node.name} ({node.op} {target})"


def is_homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Dropout):
            return not module.training
        return isinstance(module, _HOMOGENEOUS_MODULES)
    if node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if name == "dropout":
            return node.kwargs.get("training", True) is False
        return name in _HOMOGENEOUS_FUNCTIONS and len(node.all_input_nodes) == 1
    return False


def call_count(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def install_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` in ``gm``'s own module tree (parents of leaves are the
    GraphModule's containers, so the user's model is not touched)."""
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, module)


def refit_weight_quantizer(conv: nn.Module, ctx: PassContext) -> None:
    """Re-derive a folded QuantConv2d's weight quantizer from its new weights."""
    if isinstance(conv, QuantConv2d):
        conv.weight_quantizer = weight_quantizer(conv, ctx.recipe.weights,
                                                 conv.weight_quantizer.bits)


def _split_slice(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(split input, channel offset)`` when ``node`` is ``getitem(torch.split(x, sizes,
    dim=1), i)`` with constant sizes and no other getitem takes slice i; else None."""
    if node.op != "call_function" or getattr(node.target, "__name__", "") != "getitem":
        return None
    source, index = node.args[0], node.args[1]
    if not isinstance(source, fx.Node) or not isinstance(index, int):
        return None
    if source.op == "call_function" and getattr(source.target, "__name__", "") == "split":
        args = list(source.args) + [None] * 3
        tensor, sizes = args[0], source.kwargs.get("split_size_or_sections", args[1])
        dim = source.kwargs.get("dim", args[2] if args[2] is not None else 0)
    elif source.op == "call_method" and source.target == "split":
        args = list(source.args) + [None] * 3
        tensor, sizes = args[0], source.kwargs.get("split_size", args[1])
        dim = source.kwargs.get("dim", args[2] if args[2] is not None else 0)
    else:
        return None
    if dim != 1 or not isinstance(sizes, (list, tuple)) or not all(isinstance(v, int) for v in sizes):
        return None
    if not isinstance(tensor, fx.Node) or not 0 <= index < len(sizes):
        return None
    same = [u for u in source.users if u is not node and u.args[1:2] == (index,)]
    if same or any(getattr(u.target, "__name__", "") != "getitem" for u in source.users):
        return None
    return tensor, sum(sizes[:index])


def find_producer(gm: fx.GraphModule, qnode: fx.Node) -> tuple[fx.Node | None, int, str]:
    """The conv whose output channels can absorb the quantizer's ``pre`` scale, the channel
    offset of the quantizer's input within that conv's output, or why there is none.

    Walks up from the quantizer's input through positively homogeneous single-user ops
    (ReLU, LeakyReLU, PReLU, identity) and channel slices of ``torch.split`` (dim 1) to a
    conv that is called once and whose only user is that chain: then
    ``conv → act → q(x·pre)`` equals ``conv' → act → q(x)`` with the conv's output channel
    ``offset + c`` (weights and bias) multiplied by ``pre_c``.
    """
    node = qnode.args[0]
    child = qnode
    offset = 0
    while True:
        if not isinstance(node, fx.Node):
            return None, 0, "input is not a graph value"
        sliced = _split_slice(node)
        if sliced is not None and len(node.users) == 1:
            tensor, start = sliced
            split = node.args[0]
            others = [u.name for u in tensor.users if u is not split]
            if others:
                return None, 0, f"{tensor.name} also feeds {', '.join(sorted(others))} " \
                                "(e.g. a residual add)"
            offset += start
            child, node = split, tensor
            continue
        others = [u.name for u in node.users if u is not child]
        if others:
            return None, 0, f"{node.name} also feeds {', '.join(sorted(others))} " \
                            "(e.g. a residual add)"
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _FOLDABLE_CONVS):
            calls = call_count(gm, node.target)
            if calls > 1:
                return None, 0, f"conv module '{node.target}' is called {calls} times (shared weights)"
            return node, offset, ""
        if not is_homogeneous(gm, node):
            return None, 0, f"input comes from {describe_op(gm, node)}, not a conv through " \
                            "positively homogeneous ops"
        child, node = node, node.all_input_nodes[0] if node.all_input_nodes else None


def reader_problem(gm: fx.GraphModule, qnode: fx.Node, user: fx.Node,
                   convs: tuple = _FOLDABLE_CONVS) -> str:
    """Why ``user`` cannot absorb a per-input-channel scale of ``qnode``'s value ("" if it
    can): it must be a conv of ``convs`` reading that value as its only input, called once."""
    module = gm.get_submodule(user.target) if user.op == "call_module" else None
    if not isinstance(module, convs):
        return f"quantizer feeds {describe_op(gm, user)}, not a conv"
    if user.args[0] is not qnode or any(a is qnode for a in list(user.args[1:]) + list(user.kwargs.values())):
        return f"quantizer output is not {user.name}'s only input"
    calls = call_count(gm, user.target)
    if calls > 1:
        return f"conv module '{user.target}' is called {calls} times (shared weights)"
    return ""


def find_consumer(gm: fx.GraphModule, qnode: fx.Node) -> tuple[fx.Node | None, str]:
    """The conv whose input channels can absorb the quantizer's ``post`` scale, or why not."""
    users = list(qnode.users)
    if len(users) != 1:
        return None, f"quantizer output has {len(users)} users"
    why = reader_problem(gm, qnode, users[0])
    return (None, why) if why else (users[0], "")


def probe_input(ctx: PassContext, size: int = 24) -> tuple | None:
    if ctx.example_inputs is not None:
        return tuple(ctx.example_inputs)
    if ctx.calib is None:
        return None
    first = as_batches(ctx.calib, 1)[0]
    return tuple(t[:1, ..., :size, :size] if t.ndim == 4 else t[:1] for t in first)


def relative_error(ref, out) -> float:
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    worst = 0.0
    for r, o in zip(refs, outs):
        if isinstance(r, torch.Tensor):
            scale = float(r.abs().max()) or 1.0
            worst = max(worst, float((r - o).abs().max()) / scale)
    return worst


class FloatOutputCheck:
    """The graph's float output (every quantizer off) on a probe input, taken before a pass
    folds anything, so that :meth:`error` can tell how far the folds moved it (relative
    max-abs). Inert (``error`` is None) without a probe or when ``enabled`` is false."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, enabled: bool = True):
        self.gm = gm
        self.probe = probe_input(ctx) if enabled and ctx.calibrate else None
        self.reference = self._run() if self.probe is not None else None

    def _run(self):
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad(), quant_mode(self.gm, "off"):
                return self.gm(*self.probe)
        finally:
            self.gm.train(was_training)

    def error(self) -> float | None:
        return None if self.probe is None else relative_error(self.reference, self._run())
