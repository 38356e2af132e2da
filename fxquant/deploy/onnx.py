"""ONNX export of static uniform and I²NQ models: the ``reference`` lowering written as ONNX
integer ops.

The compiled model is lowered (``fxquant.lowered_copy(gm, "reference")``: uint8 activation
codes, int8 weight codes, the exact integer semantics of docs/lowering.md) and traced by
torch's TorchScript ONNX exporter; every float op (pixel shuffle → DepthToSpace CRD,
interpolate → Resize, cat, add, mul, sigmoid, leaky ReLU, IMDN's mean/std) is the exporter's
own translation, and the integer modules emit their ONNX form:

- activation quantizer → ``QuantizeLinear`` (per tensor, uint8 zero point; ``Clip`` below 8
  bits); I²NQ's levels on a uint8 grid → their half-step bucket (``Div``, ``Ceil``, ``Add``,
  ``Clip``, as the lowering computes it) and a ``Gather`` of the grid codes (integer form);
- quantized conv, two forms:

  ``qdq``: ``DequantizeLinear`` of the uint8 codes, of the weight initializer (per output
  channel, axis 0) and of an int32 bias at scale ``s_x·s_w`` → ``Conv``. ONNX Runtime fuses
  ``DQ → Conv → Q`` into ``QLinearConv``, so this form is chosen for a conv whose only reader
  is the next layer's quantizer (a ReLU in between is dropped when that quantizer's zero
  point is 0: exact, the quantizer clamps negatives to code 0). The weights are stored as
  uint8 ``k + 128`` with zero point 128: ONNX Runtime then runs u8 × u8, exact on every CPU,
  where u8 × s8 sums product pairs in a saturating int16 on CPUs without VNNI
  (fxquant/lower/int8_pairs.py) and gives wrong outputs there;

  ``integer``: ``ConvInteger`` (uint8 codes × weights stored as uint8 ``k + 128`` with zero
  point 128 → int32) → ``Cast`` → ``Mul`` by
  ``s_x·s_w`` → ``Add`` bias: a float output computed exactly as the ``reference`` target,
  for every other conv (leaky ReLU, residual adds, attention, concatenation read it; ONNX
  Runtime keeps ``DQ → Conv`` without a following ``Q`` as a float conv).
  Asymmetric weights (the ``minmax`` weight observer: a channel's codes need not contain 0)
  are centred as in the lowering, ``k = (k − c) + c``, and the ``c`` part is an exact
  second ``ConvInteger`` with an all-ones kernel (the window sums ``S``).

``form="integer"`` (default) picks per conv as above; ``form="qdq"`` writes every conv in the
QDQ form with int8 weights and zero point 0 (what TensorRT and other QDQ consumers read; ONNX
Runtime runs it u8 × s8, so not exactly on CPUs without VNNI) and refuses asymmetric weights.
``form="fake-quant"`` exports the fake-quant graph itself as float ONNX ops, for any recipe whose
quantizers trace: DAQ's per-(image, channel) statistics and DFSQ's per-input normalization and
level lookup become graph ops computed per input; no integer kernels.
Opset 13: the first with per-axis ``QuantizeLinear``/``DequantizeLinear``, read by every
current runtime (ONNX Runtime, TensorRT 8+, OpenVINO).
"""

from __future__ import annotations

import copy
import io
import os
import warnings

import torch
from torch import fx, nn

from fxquant.checks import check_compiled
from fxquant.deploy.errors import ExportError
from fxquant.errors import PassError
from fxquant.files import atomic_write_bytes
from fxquant.graph import is_relu, module_of
from fxquant.lower.codebook import CodebookQuantize
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.guard import InputGuard
from fxquant.lower.padding import pad_codes
from fxquant.lower.uniform_codes import IntegerQuantize
from fxquant.quant import QuantConv2d, Quantizer, UniformQuantizer

OPSET = 13
FORMS = ("integer", "qdq", "fake-quant")
INPUT, OUTPUT = "lr", "sr"
_FLOAT, _UINT8, _INT8, _INT32, _INT64 = 1, 2, 3, 6, 7  # onnx.TensorProto data types


def _const(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


def _conv_attrs(conv: ReferenceConv2d, groups: int) -> dict:
    ph, pw = conv.padding
    return {"kernel_shape_i": list(conv.kernel_size), "strides_i": list(conv.stride),
            "pads_i": [ph, pw, ph, pw], "dilations_i": list(conv.dilation), "group_i": groups}


def _untraced(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with the TorchScript tracer paused: the autograd function's symbolic is
    its ONNX form, and a recorded body of ATen ops only breaks the exporter's passes."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        return module(x)
    finally:
        torch._C._set_tracing_state(state)


class _CodesFn(torch.autograd.Function):
    """An activation's codes module run as it is (the tracer paused); a subclass gives its
    ONNX symbolic."""

    @staticmethod
    def forward(ctx, x, module):
        return _untraced(module, x)


class _QuantizeFn(_CodesFn):
    @staticmethod
    def symbolic(g, x, module: IntegerQuantize):
        zero_point = _const(g, module.zero_point.to(torch.uint8).reshape(()))
        codes = g.op("QuantizeLinear", x, _const(g, module.scale.float().reshape(())), zero_point)
        if module.qmax < 255:  # below 8 bits QuantizeLinear saturates at 255: clip to qmax
            codes = g.op("Clip", codes, _const(g, torch.tensor(0, dtype=torch.uint8)),
                         _const(g, torch.tensor(module.qmax, dtype=torch.uint8)))
        return codes


def _uint8_weights(conv: ReferenceConv2d) -> torch.Tensor:
    """The int8 weight codes as uint8 ``k + 128``, read with zero point 128: the same integer
    products, run by ONNX Runtime as u8 × u8 (faster for ConvInteger, and exact on CPUs
    without VNNI, where u8 × s8 pair sums saturate)."""
    return (conv.weight_codes.to(torch.int16) + 128).to(torch.uint8)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, module: ReferenceConv2d, form: str):
        return _untraced(module, codes)

    @staticmethod
    def symbolic(g, codes, conv: ReferenceConv2d, form: str):
        out = conv.out_channels
        rescale = (conv.input_scale * conv.weight_scale).float()  # as ReferenceConv2d computes it
        if form in ("qdq", "qdq-u8"):
            x = g.op("DequantizeLinear", codes, _const(g, conv.input_scale.float().reshape(())),
                     _const(g, conv.input_zero_point.to(torch.uint8).reshape(())))
            if form == "qdq":
                w = g.op("DequantizeLinear", _const(g, conv.weight_codes),
                         _const(g, conv.weight_scale.float()),
                         _const(g, torch.zeros(out, dtype=torch.int8)), axis_i=0)
            else:
                w = g.op("DequantizeLinear", _const(g, _uint8_weights(conv)),
                         _const(g, conv.weight_scale.float()),
                         _const(g, torch.full((out,), 128, dtype=torch.uint8)), axis_i=0)
            inputs = [x, w]
            if conv.bias is not None:
                b32 = torch.round(conv.bias.double() / rescale.double())
                b32 = b32.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32)
                inputs.append(g.op("DequantizeLinear", _const(g, b32), _const(g, rescale),
                                   _const(g, torch.zeros(out, dtype=torch.int32)), axis_i=0))
            return g.op("Conv", *inputs, **_conv_attrs(conv, conv.groups))
        # uint8 weights k + 128 with zero point 128: the same products, and ONNX Runtime's
        # ConvInteger runs u8 × u8 3-4x faster than u8 × s8 (tools/bench_ort_conv.py)
        x_zp = _const(g, conv.input_zero_point.to(torch.uint8).reshape(()))
        acc = g.op("ConvInteger", codes, _const(g, _uint8_weights(conv)), x_zp,
                   _const(g, torch.tensor(128, dtype=torch.uint8)), **_conv_attrs(conv, conv.groups))
        y = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), _const(g, rescale.view(1, out, 1, 1)))
        if conv.bias is not None:
            y = g.op("Add", y, _const(g, conv.bias.float().view(1, out, 1, 1)))
        if not bool((conv.weight_centre != 0).any()):
            return y
        # centring: y + (c_o·s_w[o])·(s_x·S), S the window sums of (q − z) per group
        groups = conv.groups
        ones = torch.ones((groups, conv.in_channels // groups) + conv.kernel_size, dtype=torch.uint8)
        sums = g.op("ConvInteger", codes, _const(g, ones), x_zp,
                    _const(g, torch.tensor(0, dtype=torch.uint8)), **_conv_attrs(conv, groups))
        s = g.op("Mul", g.op("Cast", sums, to_i=_FLOAT), _const(g, conv.input_scale.float().reshape(())))
        correction = (conv.weight_centre.float() * conv.weight_scale).view(1, groups, -1, 1, 1)
        if groups == 1:
            return g.op("Add", y, g.op("Mul", _const(g, correction.view(1, out, 1, 1)), s))
        s = g.op("Unsqueeze", s, _const(g, torch.tensor([2], dtype=torch.int64)))
        term = g.op("Reshape", g.op("Mul", _const(g, correction), s), g.op("Shape", y))
        return g.op("Add", y, term)


class _CodebookFn(_CodesFn):
    @staticmethod
    def symbolic(g, x, module: CodebookQuantize):
        # half_step_index's float32 arithmetic, op for op (exact, so the same buckets), then
        # the bucket's uint8 grid code: one Gather from the flattened per-channel table
        rows, width = module.table.shape
        h = g.op("Ceil", g.op("Div", x, _const(g, (module.scale.float() / 2).reshape(()))))
        h = g.op("Add", h, _const(g, (2 * module.zero_point).float().reshape(())))
        h = g.op("Clip", h, _const(g, torch.tensor(0.0)), _const(g, torch.tensor(width - 1.0)))
        if rows > 1:
            offsets = torch.arange(rows, dtype=torch.float32).mul_(width).view(1, rows, 1, 1)
            h = g.op("Add", h, _const(g, offsets))
        index = g.op("Cast", h, to_i=_INT64)
        return g.op("Gather", _const(g, module.table.reshape(-1)), index, axis_i=0)


class _Codes(nn.Module):
    """An activation's codes through ``fn``'s symbolic: :class:`_QuantizeFn` (uniform) or
    :class:`_CodebookFn` (I²NQ's grid codes)."""

    def __init__(self, module: IntegerQuantize | CodebookQuantize, fn):
        super().__init__()
        self.module = [module]  # a plain reference: its buffers are constants of the symbolic
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x, self.module[0])


class _Conv(nn.Module):
    def __init__(self, module: ReferenceConv2d, form: str):
        super().__init__()
        self.module, self.form = [module], form

    def forward(self, codes):
        conv = self.module[0]  # a padding mode other than zeros: an ONNX Pad of the codes
        return _ConvFn.apply(pad_codes(codes, conv.pre_pad, conv.pad_mode), conv, self.form)


def _quantize_reader(gm: fx.GraphModule, node: fx.Node):
    """``(quantize node, relu node or None)`` when ``node``'s only reader is an 8-bit
    quantizer, directly or through a ReLU that the quantizer makes redundant (zero point 0)."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    relu = None
    if is_relu(gm, user) and len(user.users) == 1:
        relu, user = user, next(iter(user.users))
    quantize = module_of(gm, user)
    if not isinstance(quantize, IntegerQuantize) or quantize.bits != 8:
        return None
    if relu is not None and int(quantize.zero_point) != 0:
        return None
    return user, relu


def check_exportable(gm: fx.GraphModule, form: str = "integer") -> None:
    """Refuse, naming the quantizer, what has no static ONNX form (before lowering, whose
    own errors speak of integer kernels). The integer form also writes non-uniform levels on
    a uint8 grid (I²NQ: a table lookup of the grid codes)."""
    check_compiled(gm, "export", ExportError)
    if getattr(gm, "fxquant_lowered", None):
        raise ExportError(f"the model is already lowered (target '{gm.fxquant_lowered}'); export "
                          "the fake-quant model it was lowered from")
    for name, module in gm.named_modules():
        if not isinstance(module, Quantizer) or isinstance(module, UniformQuantizer):
            continue
        if module.kind == "nonuniform" and form == "integer":
            continue  # lowered to a codebook (or refused by the lowering if off the grid)
        what = {"daq": "DAQ's per-(image, channel) ranges (mean ± k·std computed per input)",
                "subset": "DFSQ's per-input channel normalization and subset levels",
                "nonuniform": "non-uniform level lookup (I²NQ)"}.get(module.kind, module.kind)
        raise ExportError(
            f"quantizer '{name}' ({module.kind}, recipe '{gm.fxquant_recipe.name}'): {what} has "
            "no static ONNX QuantizeLinear/DequantizeLinear form; ONNX export takes static uniform "
            "presets (minmax-w8a8, mse-w8a8, mse-w8a8-sym, percentile-w8a8), and I²NQ's levels "
            "on a uint8 grid in form='integer'; use form='fake-quant' (the statistics as float "
            "graph ops, no integer kernels) for this model")


def integer_graph(gm: fx.GraphModule, form: str = "integer") -> fx.GraphModule:
    """The ``reference`` lowering of ``gm`` with each integer module wrapped for the ONNX
    exporter (see the module docstring); ReLUs made redundant by a QLinearConv's output
    quantizer are removed."""
    import fxquant

    if form not in ("integer", "qdq"):
        raise ExportError(f"ONNX form '{form}' unknown; valid: {', '.join(FORMS)}")
    check_exportable(gm, form)
    try:
        lowered = fxquant.lowered_copy(gm, "reference")
    except PassError as exc:
        raise ExportError(f"ONNX export writes the integer lowering, which refused the model: {exc}") from exc
    graph = lowered.graph
    for node in list(graph.nodes):
        module = module_of(lowered, node)
        if isinstance(module, InputGuard):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif isinstance(module, CodebookQuantize):
            lowered.add_submodule(node.target, _Codes(module, _CodebookFn))
    for node in list(graph.nodes):
        module = module_of(lowered, node)
        if isinstance(module, IntegerQuantize):
            if module.channels is not None:
                raise ExportError(f"'{node.target}' has per-channel activation ranges (recipe "
                                  f"'{gm.fxquant_recipe.name}'): ONNX's ConvInteger and QLinear "
                                  "ops take one input zero point; export a per-tensor preset "
                                  "(e.g. mse-w8a8-sym) or write a torch.export program")
            if form == "qdq" and module.bits != 8:
                raise ExportError(f"'{node.target}' is a {module.bits}-bit activation quantizer; "
                                  "the QDQ form writes 8-bit ones only; use form='integer'")
            lowered.add_submodule(node.target, _Codes(module, _QuantizeFn))
        elif isinstance(module, ReferenceConv2d):
            centred = bool((module.weight_centre != 0).any())
            reader = _quantize_reader(lowered, node)
            if form == "qdq" and centred:
                raise ExportError(
                    f"conv '{module.source}' has asymmetric per-channel weights (recipe "
                    f"'{gm.fxquant_recipe.name}', weights.observer = 'minmax'), which QDQ cannot "
                    "write with int8 zero points; use the mse-w8a8-sym preset (symmetric "
                    "weights) or form='integer' (exact, ConvInteger)")
            use_qdq = form == "qdq" or (not centred and reader is not None)
            if use_qdq and reader is not None and reader[1] is not None:
                reader[1].replace_all_uses_with(node)
                graph.erase_node(reader[1])
            lowered.add_submodule(node.target, _Conv(module, ("qdq" if form == "qdq" else "qdq-u8")
                                                     if use_qdq else "integer"))
    graph.lint()
    lowered.recompile()
    return lowered


def _example(gm: fx.GraphModule, example_inputs: tuple | None) -> tuple:
    if example_inputs is not None:
        if not (isinstance(example_inputs, tuple) and len(example_inputs) == 1
                and isinstance(example_inputs[0], torch.Tensor) and example_inputs[0].dim() == 4):
            raise ExportError("example_inputs must be a tuple holding one N×C×H×W image batch, "
                              f"got {type(example_inputs).__name__}")
        return (example_inputs[0].float(),)
    guard = next((m for m in gm.modules() if isinstance(m, InputGuard)), None)
    first = next((m for m in gm.modules() if isinstance(m, nn.Conv2d)), None)
    channels = guard.channels if guard is not None else (first.in_channels if first else 3)
    return (torch.rand(1, channels, 16, 16, generator=torch.Generator().manual_seed(0)),)


def _constants_to_initializers(model) -> None:
    """Move tensor ``Constant`` nodes into graph initializers (named after their output):
    weights then show as initializers, as tools (Netron, quantization checkers) expect."""
    keep = []
    for node in model.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value":
            tensor = attr.t
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def fake_quant_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the fake-quant model (form ``fake-quant``) whose weights are their fake-quant
    values, computed here by torch, with the weight quantizers switched off: the weights are
    constants, and the exporter's own translation of a weight quantizer's statistics (DAQ's
    per-tensor std) moved one IMDN weight across a rounding boundary."""
    check_compiled(gm, "export", ExportError)
    if getattr(gm, "fxquant_lowered", None):
        raise ExportError(f"the model is already lowered (target '{gm.fxquant_lowered}'); export "
                          "the fake-quant model it was lowered from")
    module = copy.deepcopy(gm)
    with torch.no_grad():
        for conv in module.modules():
            if isinstance(conv, QuantConv2d) and conv.weight_quantizer.quant_mode == "fake-quant":
                conv.weight.copy_(conv.weight_quantizer(conv.weight))
                conv.weight_quantizer.quant_mode = "off"
    return module


def to_onnx(gm: fx.GraphModule, example_inputs: tuple | None = None, *, form: str = "integer",
            opset: int = OPSET):
    """The ONNX ModelProto of compiled model ``gm`` (checked with ``full_check``)."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("ONNX export needs the onnx package: pip install 'fxquant[deploy]'") from exc
    if opset < OPSET:
        raise ExportError(f"opset {opset} has no per-axis QuantizeLinear/DequantizeLinear; "
                          f"give {OPSET} or later")
    module = fake_quant_graph(gm) if form == "fake-quant" else integer_graph(gm, form)
    example = _example(gm, example_inputs)
    dims = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy-exporter deprecation and tracer warnings
            module(*example)  # fills per-layer caches (DFSQ's level table) so they export as constants
            torch.onnx.export(module, example, buffer, dynamo=False, opset_version=opset,
                              input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: dims,
                                            OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}})
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise ExportError(f"recipe '{gm.fxquant_recipe.name}', ONNX form '{form}': "
                          f"{str(exc).splitlines()[0]}; try a later opset") from exc
    model = onnx.load_from_string(buffer.getvalue())
    _constants_to_initializers(model)
    model.producer_name, model.doc_string = "fxquant", (
        f"recipe {gm.fxquant_recipe.name}; ONNX form '{form}' (docs/deploy.md)")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return model


def export_onnx(gm: fx.GraphModule, path: str | os.PathLike, example_inputs: tuple | None = None,
                *, form: str = "integer", opset: int = OPSET):
    """Write :func:`to_onnx`'s model to ``path`` atomically; returns the ModelProto."""
    model = to_onnx(gm, example_inputs, form=form, opset=opset)
    atomic_write_bytes(path, model.SerializeToString(), "ONNX model")
    return model
