"""``torch.export`` ExportedPrograms of compiled models (fake-quant or the ``reference``
lowering), saved with ``torch.export.save``; batch, height and width stay dynamic.

Two things in fxquant's modules are not capturable as written and are handled here:

- the ``reference`` conv decides in Python whether a layer has centred weights and checks
  its accumulators for int32 overflow (``bool(tensor.any())``: data-dependent for
  torch.export). The exported copy decides centring once, from the weights, and leaves the
  overflow check to the ``lower`` pass, which proved the bound for every layer;
- the ``cpu`` target keeps oneDNN's prepacked weights, opaque tensors that torch.export cannot
  serialize: refused with an error naming the target.

A model whose capture fails for another reason (DAQ and DFSQ compute their ranges with
data-dependent Python) gets an :class:`ExportError` naming the first module that fails to
export on its own, found by exporting each quantizer and leaf module with the input the model
gave it.
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import torch
from torch import fx, nn

from fxquant.deploy.errors import ExportError
from fxquant.files import atomic_write_bytes
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.padding import pad_codes
from fxquant.quant import Quantizer

TARGETS = ("fake-quant", "reference", "cpu")


class _ExportReferenceConv2d(nn.Module):
    """:class:`ReferenceConv2d`'s arithmetic with its Python decisions taken at build time."""

    def __init__(self, conv: ReferenceConv2d):
        super().__init__()
        self.conv = conv
        self.centred = bool((conv.weight_centre != 0).any())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        codes = pad_codes(codes, conv.pre_pad, conv.pad_mode)  # reflect, replicate, circular
        q = codes.double() - conv.input_zero_point.double()
        acc = torch.nn.functional.conv2d(q, conv.weight_codes.double(), None, conv.stride,
                                         conv.padding, conv.dilation, conv.groups)
        y = acc.to(torch.int32).float() * (conv.input_scale * conv.weight_scale).view(1, -1, 1, 1)
        if conv.bias is not None:
            y = y + conv.bias.view(1, -1, 1, 1)
        if not self.centred:
            return y
        sums = conv.window_sum(codes, torch.float64).to(torch.int32)
        return conv.add_centring(y, sums.float())


def exportable_module(gm: fx.GraphModule, target: str = "fake-quant") -> nn.Module:
    """The module that is exported for ``target``: ``gm`` itself, or its lowering with the
    reference convs made capturable."""
    import fxquant

    if target not in TARGETS:
        raise ExportError(f"torch-export target '{target}' unknown; valid: {', '.join(TARGETS)}")
    if not hasattr(gm, "fxquant_recipe"):
        raise ExportError("export takes a model compiled by fxquant.compile (or fxquant.load); "
                          f"got a {type(gm).__name__} without a recipe")
    if target == "cpu" or getattr(gm, "fxquant_lowered", None) == "cpu":
        raise ExportError("the lowered cpu target holds oneDNN's prepacked weights (opaque "
                          "tensors) that torch.export cannot serialize; export target "
                          "'reference' (the same integer arithmetic) or 'fake-quant'")
    if target == "fake-quant":
        return gm
    if getattr(gm, "fxquant_lowered", None):
        lowered = copy.deepcopy(gm)
    else:
        try:
            lowered = fxquant.lowered_copy(gm, target)
        except fxquant.FxquantError as exc:
            raise ExportError(f"target '{target}' needs the integer lowering, which refused "
                              f"the model: {exc}") from exc
    for node in lowered.graph.nodes:
        if node.op == "call_module" and isinstance(lowered.get_submodule(node.target), ReferenceConv2d):
            lowered.add_submodule(node.target, _ExportReferenceConv2d(lowered.get_submodule(node.target)))
    lowered.recompile()
    return lowered


def _dynamic(example: torch.Tensor):
    dim = torch.export.Dim.DYNAMIC
    return ({0: dim, 2: dim, 3: dim},)


def _example(gm: nn.Module, example_inputs: tuple | None) -> tuple:
    if example_inputs is None:
        channels = next((m.in_channels for m in gm.modules() if isinstance(m, nn.Conv2d)), 3)
        x = torch.rand(2, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    else:
        if not (isinstance(example_inputs, tuple) and len(example_inputs) == 1
                and isinstance(example_inputs[0], torch.Tensor) and example_inputs[0].dim() == 4):
            raise ExportError("example_inputs must be a tuple holding one N×C×H×W image batch")
        x = example_inputs[0].float()
    # a dimension of size 1 is specialised by torch.export: trace with 2 so it stays dynamic
    if x.shape[0] == 1:
        x = x.expand(2, -1, -1, -1).contiguous()
    return (x,)


def _culprit(module: nn.Module, example: tuple) -> str:
    """The first quantizer or leaf module (graph order) that torch.export cannot capture on
    its own, with the input the model gave it, and why; '' when each exports alone."""
    seen: list[tuple[str, nn.Module, tuple]] = []
    hooks = [sub.register_forward_pre_hook(
        lambda m, args, name=name: seen.append((name, m, args)))
        for name, sub in module.named_modules()
        if isinstance(sub, Quantizer) or (name and not list(sub.children()))]
    try:
        with torch.no_grad():
            module(*example)
    finally:
        for hook in hooks:
            hook.remove()
    done = set()
    for name, sub, args in seen:
        if name in done or not args or not all(isinstance(a, torch.Tensor) for a in args):
            continue
        done.add(name)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.export(sub, tuple(args))
        except Exception as exc:  # noqa: BLE001 - any capture failure names the module
            reason = str(exc).strip().splitlines()[0][:200]
            kind = getattr(sub, "kind", type(sub).__name__)
            return f"'{name}' ({kind}: {type(exc).__name__}: {reason})"
    return ""


def to_program(gm: fx.GraphModule, example_inputs: tuple | None = None, *,
               target: str = "fake-quant") -> torch.export.ExportedProgram:
    """The ExportedProgram of ``gm`` (``target``: fake-quant or reference)."""
    module = exportable_module(gm, target)
    example = _example(module, example_inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, example, dynamic_shapes=_dynamic(example[0]))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds
        culprit = _culprit(module, example)
        recipe = gm.fxquant_recipe.name
        where = (f"module {culprit} cannot be captured" if culprit
                 else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
        raise ExportError(f"torch.export cannot capture recipe '{recipe}' (target '{target}'): "
                          f"{where}. Static uniform presets export; DAQ and DFSQ compute their "
                          "per-input ranges with data-dependent Python, which torch.export does not "
                          "trace (docs/deploy.md)") from exc


def export_program(gm: fx.GraphModule, path: str | os.PathLike, example_inputs: tuple | None = None,
                   *, target: str = "fake-quant") -> torch.export.ExportedProgram:
    """Export with :func:`to_program` and save with ``torch.export.save`` (atomically)."""
    program = to_program(gm, example_inputs, target=target)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue(), "ExportedProgram")
    return program


def _trace_checked(module: nn.Module, example: tuple, check: tuple):
    """``torch.jit.trace`` on ``example``, accepted only if the trace computes what the module
    computes on ``check`` (another size and content): tracing's own graph comparison is
    stricter than needed (DFSQ's per-layer lookup table traces as ops on one call and as a
    constant on another, with the same values), a numerical check on a new input is what
    matters. Under no_grad: quantizers take the straight-through path only when their input
    needs a gradient."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        expected, got = module(*check), traced(*check)
    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape
            and torch.allclose(got, expected, rtol=0, atol=1e-5)):
        raise ExportError("the trace computes something else on a second input of another size "
                          "(values or shapes of the example were frozen into it)")
    return traced


def _other_size(x: torch.Tensor) -> torch.Tensor:
    """A second input of another size and content, for the trace's check."""
    n, c, h, w = x.shape
    return torch.rand(n, c, h + 3, w + 5, generator=torch.Generator().manual_seed(1)) * \
        float(x.abs().max().clamp(min=1e-6))


def to_torchscript(gm: fx.GraphModule, example_inputs: tuple | None = None, *,
                   target: str = "fake-quant") -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``gm`` (or its reference lowering), checked on a second input of
    another size (:func:`_trace_checked`); when the check fails, the error names the first
    quantizer whose own trace fails it. DAQ traces (its statistics are tensor ops); ``torch.jit.script``
    is not offered: fxquant's quantizers keep Python state (observed ranges, modes) that
    TorchScript cannot type."""
    module = exportable_module(gm, target)
    example = _example(module, example_inputs)
    check = (_other_size(example[0]),)
    try:
        return _trace_checked(module, example, check)
    except Exception as exc:  # noqa: BLE001 - tracing raises many kinds
        culprit = _trace_culprit(module, example, check)
        where = culprit or f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        raise ExportError(f"torch.jit.trace cannot capture recipe '{gm.fxquant_recipe.name}' "
                          f"(target '{target}'): {where} (docs/deploy.md)") from exc


def _trace_culprit(module: nn.Module, example: tuple, check: tuple) -> str:
    """The first quantizer (call order) whose own trace fails :func:`_trace_checked`."""
    calls: dict[str, list] = {}
    hooks = [sub.register_forward_pre_hook(lambda m, args, name=name: calls.setdefault(
        name, [m]).append(args)) for name, sub in module.named_modules() if isinstance(sub, Quantizer)]
    try:
        with torch.no_grad():
            module(*example)
            module(*check)
    finally:
        for hook in hooks:
            hook.remove()
    for name, (sub, *inputs) in calls.items():
        if len(inputs) < 2:
            continue
        try:
            _trace_checked(sub, tuple(inputs[0]), tuple(inputs[1]))
        except Exception as exc:  # noqa: BLE001
            return f"quantizer '{name}' ({sub.kind}: {str(exc).strip().splitlines()[0][:160]})"
    return ""


def export_torchscript(gm: fx.GraphModule, path: str | os.PathLike,
                       example_inputs: tuple | None = None, *, target: str = "fake-quant"):
    """Trace with :func:`to_torchscript` and save with ``torch.jit.save`` (atomically)."""
    traced = to_torchscript(gm, example_inputs, target=target)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    atomic_write_bytes(path, buffer.getvalue(), "TorchScript module")
    return traced


def load_program(path: str | os.PathLike) -> nn.Module:
    """``torch.export.load(path).module()``: a callable module of a saved program."""
    return torch.export.load(str(path)).module()
