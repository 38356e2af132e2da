"""``fold-channel-norm``: fold static DFSQ channel scales into neighbouring convs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.calibration import as_batches
from fxquant.errors import PassError
from fxquant.quant.fitting import weight_quantizer
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, quant_mode
from fxquant.quant.channel_norm import fold_input_scale, fold_output_scale
from fxquant.quant.subset import SubsetQuantizer

# Positively homogeneous ops (f(a·x) = a·f(x) for a > 0, per channel) a scale can cross.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_HOMOGENEOUS_FUNCTIONS = {"relu", "leaky_relu"}
_FOLDABLE_CONVS = (nn.Conv2d,)


def _describe_op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name} ({type(gm.get_submodule(node.target)).__name__})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "?")
    return f"{node.name} ({node.op} {target})"


def _is_homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
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


def _calls(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _install(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at ``target`` in ``gm``'s own module tree (parents of leaves are the
    GraphModule's containers, so the user's model is not touched)."""
    parent_name, _, child = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, child, module)


def _refit(conv: nn.Module, ctx: PassContext) -> None:
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
            calls = _calls(gm, node.target)
            if calls > 1:
                return None, 0, f"conv module '{node.target}' is called {calls} times (shared weights)"
            return node, offset, ""
        if not _is_homogeneous(gm, node):
            return None, 0, f"input comes from {_describe_op(gm, node)}, not a conv through " \
                            "positively homogeneous ops"
        child, node = node, node.all_input_nodes[0] if node.all_input_nodes else None


def find_consumer(gm: fx.GraphModule, qnode: fx.Node) -> tuple[fx.Node | None, str]:
    """The conv whose input channels can absorb the quantizer's ``post`` scale, or why not."""
    users = list(qnode.users)
    if len(users) != 1:
        return None, f"quantizer output has {len(users)} users"
    (user,) = users
    if user.op != "call_module" or not isinstance(gm.get_submodule(user.target), _FOLDABLE_CONVS):
        return None, f"quantizer feeds {_describe_op(gm, user)}, not a conv"
    if user.args[0] is not qnode or any(a is qnode for a in list(user.args[1:]) + list(user.kwargs.values())):
        return None, f"quantizer output is not {user.name}'s only input"
    calls = _calls(gm, user.target)
    if calls > 1:
        return None, f"conv module '{user.target}' is called {calls} times (shared weights)"
    return user, ""


def _probe(ctx: PassContext, size: int = 24) -> tuple | None:
    if ctx.example_inputs is not None:
        return tuple(ctx.example_inputs)
    if ctx.calib is None:
        return None
    first = as_batches(ctx.calib, 1)[0]
    return tuple(t[:1, ..., :size, :size] if t.ndim == 4 else t[:1] for t in first)


def _relative_error(ref, out) -> float:
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    worst = 0.0
    for r, o in zip(refs, outs):
        if isinstance(r, torch.Tensor):
            scale = float(r.abs().max()) or 1.0
            worst = max(worst, float((r - o).abs().max()) / scale)
    return worst


@register_pass
@dataclass(frozen=True)
class FoldChannelNormPass(Pass):
    """Fold each static-mode :class:`SubsetQuantizer`'s per-channel scales into convs.

    Before::

        conv_p ──► relu ──► q{x·pre ─ round ─ ·post} ──► conv_c

    After (both folds possible)::

        conv_p' ──► relu ──► q{round} ──► conv_c'     W_p'[c] = pre_c·W_p[c], b_p'[c] = pre_c·b_p[c]
                                                       W_c'[:, c] = post_c·W_c[:, c]

    ``pre`` (1/s) goes into the producer conv's output channels when the value reaches the
    quantizer only through positively homogeneous ops (ReLU, LeakyReLU, PReLU) and channel
    slices of ``torch.split`` (the slice's channels only), and feeds nothing else; ``post`` (s) goes into the consumer conv's input channels unless the conv
    module is shared by several calls. Folded convs are copies (the float model is untouched)
    and their weight quantizers are re-fitted. A scale that cannot be folded stays a float
    per-channel multiply inside the quantizer; every refusal is reported with its reason in
    ``ctx.state["fold-channel-norm"]`` and counted in ``info``.

    With ``check`` (and a probe input: ``ctx.example_inputs`` or the first calibration
    sample), every fold is verified: the graph in float mode (no rounding) must give the
    same output as before the fold to ``tol`` relative (max-abs), else the pass fails.
    Dynamic-mode quantizers cannot be folded statically and are skipped.
    """

    name: ClassVar[str] = "fold-channel-norm"
    check: bool = True
    tol: float = 1e-5

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        qnodes = [n for n in gm.graph.nodes if n.op == "call_module"
                  and isinstance(gm.get_submodule(n.target), SubsetQuantizer)
                  and gm.get_submodule(n.target).mode == "static"]
        dynamic = sum(1 for m in gm.modules() if isinstance(m, SubsetQuantizer)) - len(qnodes)
        report: dict[str, dict] = {}
        probe = _probe(ctx) if self.check and ctx.calibrate and qnodes else None
        reference = None
        if probe is not None:
            with torch.no_grad(), quant_mode(gm, "off"):
                reference = gm(*probe)
        worst = 0.0
        counts = {"pre_folded": 0, "post_folded": 0, "pre_refused": 0, "post_refused": 0}

        def verify(what: str, node: fx.Node) -> None:
            nonlocal worst
            if reference is None:
                return
            with torch.no_grad(), quant_mode(gm, "off"):
                err = _relative_error(reference, gm(*probe))
            worst = max(worst, err)
            if err > self.tol:
                raise PassError(self.name, f"folding {what} changed the float output by {err:.3g} "
                                f"relative (tolerance {self.tol:g})", node=node.name)

        for qnode in qnodes:
            quantizer: SubsetQuantizer = gm.get_submodule(qnode.target)
            entry = {}
            producer, offset, why = find_producer(gm, qnode)
            if producer is not None:
                conv = gm.get_submodule(producer.target)
                factor = torch.ones(conv.out_channels)
                factor[offset:offset + quantizer.channels] = quantizer.pre
                new = fold_output_scale(conv, factor)
                _refit(new, ctx)
                _install(gm, producer.target, new)
                with torch.no_grad():
                    if quantizer.guard:  # the guard now sees x·pre
                        quantizer.guard_lo.mul_(quantizer.pre)
                        quantizer.guard_hi.mul_(quantizer.pre)
                    quantizer.pre.fill_(1.0)
                where = f" {offset}..{offset + quantizer.channels - 1}" if offset or \
                    quantizer.channels != conv.out_channels else ""
                entry["pre"] = f"folded into {producer.target} (output channels{where})"
                counts["pre_folded"] += 1
                verify(f"pre into {producer.target}", qnode)
            else:
                entry["pre"] = f"refused: {why}"
                counts["pre_refused"] += 1
            consumer, why = find_consumer(gm, qnode)
            if consumer is not None:
                conv = gm.get_submodule(consumer.target)
                new = fold_input_scale(conv, quantizer.post)
                _refit(new, ctx)
                _install(gm, consumer.target, new)
                with torch.no_grad():
                    quantizer.post.fill_(1.0)
                entry["post"] = f"folded into {consumer.target} (input channels)"
                counts["post_folded"] += 1
                verify(f"post into {consumer.target}", qnode)
            else:
                entry["post"] = f"refused: {why}"
                counts["post_refused"] += 1
            report[qnode.name] = entry
        gm.recompile()
        ctx.state["fold-channel-norm"] = report
        info = {"static_quantizers": len(qnodes), "dynamic_skipped": dynamic, **counts}
        if reference is not None:
            info["max_rel_error"] = worst
        return PassResult(gm, counts["pre_folded"] + counts["post_folded"] > 0, info)
