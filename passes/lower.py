"""``lower``: replace each fake-quantized conv by an integer conv (``reference`` or ``cpu``)."""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from fxquant.errors import PassError, RecipeError
from fxquant.graph import (
    OUTPUT_QUANTIZER,
    insert_output_module,
    is_relu,
    method_owner,
    module_of,
    replace_module_node,
)
from fxquant.heap import keep_freed_blocks
from fxquant.lower.conv import (
    INT32_MAX,
    TARGETS,
    CpuConv2d,
    IntegerConv2d,
    accumulator_bound,
)
from fxquant.lower.codebook import CodebookQuantize
from fxquant.lower.daq import DaqQuantize, lower_daq
from fxquant.lower.folded import DaqConv2d
from fxquant.lower.subset import CODE_GRIDS, SubsetQuantize, lower_subset
from fxquant.lower.uniform_codes import IntegerDequantize, IntegerQuantize
from fxquant.lower.guard import InputGuard
from fxquant.lower.triton_conv import GpuConv2d
from fxquant.passes.lower_rewrites import (
    dynamic_cat_pieces,
    fold_in_region,
    hoist_subset_pieces,
    phase_major_shuffles,
    quantize_cat_pieces,
    route_pixel_shuffles,
    route_smooth_upsampling,
    split_before_activation,
    subpixel_deconvs,
)
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, Quantizer, UniformQuantizer
from fxquant.quant.daq import DAQActivationQuantizer
from fxquant.quant.nonuniform import NonUniformQuantizer
from fxquant.quant.subset import SubsetQuantizer
from fxquant.quant.wcc import ClippedWeightQuantizer

SUPPORTED = ("static uniform per-tensor activation quantizers of 2..8 bits (per-channel ones "
             "once fold-input-scales has moved their steps into the convs), or non-uniform "
             "levels on a uint8 grid (i2nq presets, integer_grid = 8), in front of a Conv2d "
             "with uniform weights of 2..8 bits (the minmax-/mse-/percentile-/i2nq- presets); "
             "DAQ activations and weights (daq- presets), DFSQ subset activations with "
             "uniform weights (dfsq- presets), both on targets reference, cpu and gpu")


@register_pass
@dataclass(frozen=True)
class LowerPass(Pass):
    """Integer execution of every quantized conv.

    Before::                                      After (target=cpu)::

        x ──► c1_input_quantizer ──► c1 (QuantConv2d)   x ──► c1_input_codes (u8 NHWC) ──► c1
                                                               (CpuConv2d: int8 weights, int32 acc)

    A quantizer shared by several convs becomes one integer tensor that all of them read.
    A non-uniform quantizer whose levels lie on a uint8 grid (I²NQ) becomes a table lookup
    (level index → grid code, :class:`~fxquant.lower.codebook.CodebookQuantize`) and the
    convs read the grid codes as 8-bit uniform input.

    ``reference`` is the portable integer semantics (int codes, exact int32 accumulation,
    float32 rescale), the oracle of every other target; ``cpu`` runs the same on oneDNN
    (u8 NHWC activations, prepacked int8 weights). Ops without an integer kernel (sigmoid
    attention, pixel shuffle, concat, the float first/last convs) stay float islands, listed
    in the pass info. A guard in front of the graph rejects inputs the model cannot take.
    On ``cpu`` with ``fuse`` (default), a conv with symmetric weights whose only reader is a
    quantizer (directly or through a ReLU) emits that quantizer's uint8 codes itself (ReLU and
    requantization in oneDNN's epilogue); every pixel shuffle runs as ATen's channels-last
    kernel (opaque to Inductor) and a shuffle read only by a quantizer moves behind it,
    shuffling uint8 codes; a shuffle that reads an integer conv's output alone gets that
    conv's output channels in phase-major order (``fxquant::pixel_shuffle_phase_major``:
    the NHWC copy moves contiguous runs). On ``cpu`` a float strided ``ConvTranspose2d`` (FSRCNN's tail)
    runs as the equal conv + pixel shuffle (fxquant/lower/subpixel.py).
    ``compile`` (cpu only) compiles the module with Inductor on first call, which fuses each
    input quantization into the float op before it. Its graphs are static: each new input
    size compiles again (tens of seconds for an SR network on 2 cores), and after Dynamo's
    limit of 8 sizes further sizes run eagerly, with Dynamo's "hit config.recompile_limit"
    warning; same outputs, slower. ``dynamic`` (with ``compile``) compiles once for any
    height and width instead (once more for the first non-square input after a square one,
    whose sides Dynamo gives one symbol, and across a size threshold of Inductor's own, maps
    of 4096 positions); its kernels ran 0-4 % slower than static ones (medians, IMDN x4 at
    256x256), so it pays for inputs of many sizes (docs/performance.md, "Many input
    sizes").
    DAQ's dynamic quantizers lower on ``reference`` and ``cpu`` to per-(image, channel)
    integer codes with the steps folded into per-image weights (fxquant/lower/daq.py);
    DFSQ's subset quantizers to their points' integer codes on the 2^-10 grid, read by the
    same folded conv (fxquant/lower/subset.py); on ``gpu`` the folded weights go through the
    Triton kernel per image. Their per-image folded weights are requantized to int8 in two
    planes (``planes=2``, the residual in a second conv: layer outputs within ~2e-4 of the
    reference) or one (``planes=1``: one conv, 1–2 % of a layer's range; DAQ's balanced
    codes and expected codes keep Set5 within 0.01 dB, docs/lowering.md). DFSQ's official
    set needs 11-bit codes, two uint8 planes on ``cpu``; ``subset_codes=u8`` re-grids each
    channel whose codes pass 255 to 256 levels over its points' span: one plane, half the
    int8 convs, at a Set5 cost measured in docs/lowering.md.
    ``gpu`` runs the same integer semantics in a Triton int8 implicit-GEMM conv (CUDA, or the
    CPU under ``TRITON_INTERPRET=1``); with ``fuse`` a symmetric-weight conv also takes the
    residual of a ``conv + r`` it alone feeds, and ReLU and requantization, into its epilogue.
    """

    name: ClassVar[str] = "lower"
    target: str = "reference"
    compile: bool = False
    dynamic: bool = False  # with compile: one graph for every input size
    fuse: bool = True
    planes: int = 2  # int8 planes of DAQ's/DFSQ's per-image folded weights (cpu, gpu)
    subset_codes: str = "exact"  # DFSQ's codes: its points' own integers, or "u8": one byte

    def __post_init__(self):
        if self.target not in TARGETS:
            raise RecipeError(f"lower target '{self.target}' unknown; valid: {', '.join(TARGETS)}")
        if self.compile and self.target != "cpu":
            raise RecipeError("lower.compile applies to target=cpu only")
        if self.dynamic and not self.compile:
            raise RecipeError("lower.dynamic chooses what compile=true compiles: give "
                              "compile=true,dynamic=true (target=cpu)")
        if not self.fuse and self.target not in ("cpu", "gpu"):
            raise RecipeError("lower.fuse applies to targets cpu and gpu only")
        if isinstance(self.planes, bool) or self.planes not in (1, 2):
            raise RecipeError(f"lower.planes={self.planes}: 2 (the folded weights' int8 "
                              "residual in a second conv) or 1 (faster, lossier)")
        if self.planes != 2 and self.target not in ("cpu", "gpu"):
            raise RecipeError("lower.planes applies to targets cpu and gpu only (reference "
                              "folds exactly in float64)")
        if self.subset_codes not in CODE_GRIDS:
            raise RecipeError(f"lower.subset_codes='{self.subset_codes}': valid are "
                              f"{', '.join(CODE_GRIDS)} (DFSQ's points as their exact integer "
                              "codes, or re-gridded to one byte per code)")

    def _warn_unused_options(self, folded: int, subset: int) -> None:
        """An option given for DAQ's/DFSQ's folded convs on a model that has none changes
        nothing: say so rather than let the user believe it applied."""
        if self.planes != 2 and not folded:
            warnings.warn(f"lower.planes={self.planes} changes nothing here: it sets the int8 "
                          "planes of DAQ's and DFSQ's per-image folded weights, and this model "
                          "has no DAQ or DFSQ quantizer", UserWarning, stacklevel=3)
        if self.subset_codes != "exact" and not subset:
            warnings.warn(f"lower.subset_codes={self.subset_codes} changes nothing here: it "
                          "sets DFSQ's codes, and this model has no DFSQ subset quantizer",
                          UserWarning, stacklevel=3)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if getattr(gm, "fxquant_lowered", None):
            raise PassError(self.name, f"the graph is already lowered (target "
                            f"'{gm.fxquant_lowered}')")
        lowered = folded = subset = 0
        quantizer_nodes = [n for n in gm.graph.nodes if isinstance(module_of(gm, n), Quantizer)]
        layer_cls = TARGETS[self.target]
        for node in quantizer_nodes:
            quantizer = gm.get_submodule(node.target)
            if isinstance(quantizer, DAQActivationQuantizer):  # fxquant/lower/daq.py
                folded += lower_daq(gm, node, quantizer, self.target, self.name, self.planes)
                continue
            if isinstance(quantizer, SubsetQuantizer):  # fxquant/lower/subset.py
                subset += lower_subset(gm, node, quantizer, self.target, self.name,
                                       structure_only=not ctx.calibrate, planes=self.planes,
                                       codes=self.subset_codes)
                continue
            if str(node.target).endswith(OUTPUT_QUANTIZER):  # observe{outputs=true}
                self._lower_output(gm, node, quantizer, layer_cls)
                continue
            consumers = self._convs_of(gm, node, quantizer)
            if isinstance(quantizer, NonUniformQuantizer):  # levels → their uint8 grid codes
                codes = CodebookQuantize.from_quantizer(quantizer, layer_cls.channels_last)
                grid = quantizer.integer_grid()
            else:
                codes = IntegerQuantize.from_quantizer(quantizer, layer_cls.channels_last)
                grid = quantizer
            replace_module_node(  # the convs now read the codes node
                gm, node, codes, str(node.target).replace("_quantizer", "_codes"))
            for conv_node, conv in consumers:
                layer = layer_cls.from_quantized(grid, conv, str(conv_node.target))
                replace_module_node(gm, conv_node, layer, str(conv_node.target).replace(".", "_"))
                lowered += 1
        lowered += folded + subset
        self._warn_unused_options(folded + subset, subset)
        if not lowered:
            raise PassError(self.name, "nothing to lower: the graph has no quantizers; put "
                            "'lower' after 'quantize' (e.g. 'trace,observe,calibrate,quantize,"
                            "lower{target=cpu}')")
        left = [n for n, m in gm.named_modules() if isinstance(m, (Quantizer, QuantConv2d))]
        if left:
            raise PassError(self.name, f"{left[0]} is quantized but has no quantized input to "
                            f"lower with it; supported: {SUPPORTED}")
        fused = residuals = subpixel = phase_major = 0
        if self.target == "cpu":
            split_before_activation(gm)
            route_pixel_shuffles(gm)
            route_smooth_upsampling(gm)
            quantize_cat_pieces(gm)
            dynamic_cat_pieces(gm)
            hoist_subset_pieces(gm)
            subpixel = subpixel_deconvs(gm)
        if self.target == "gpu" and self.fuse:
            residuals = _fuse_residuals(gm)
        if self.target in ("cpu", "gpu") and self.fuse:
            fused = _fuse_uint8_outputs(gm)
        if self.target == "cpu":
            phase_major = phase_major_shuffles(gm)
            fold_in_region(gm)
        first_input = self._add_guard(gm, cpu_only=self.target != "gpu")
        gm.recompile()
        gm.fxquant_lowered = self.target
        if self.target == "cpu":
            # an SR forward allocates and frees feature maps of many MiB; with glibc's default
            # thresholds each is a fresh mmap whose pages fault in on every call (IMDN x4 at
            # 256²: 130 000 faults and a third of the lowered forward; docs/performance.md,
            # "Page faults"): keep freed blocks for reuse, process-wide, as training does
            keep_freed_blocks()
        if self.compile:
            # Inductor's C++ wrapper calls the kernels and the 40–120 oneDNN convs of an SR
            # network without a Python line per op: IMDN ×4 at 128×128 ran 40 → 31 ms,
            # bit-identical (docs/performance.md, "Integer execution: what the numbers show").
            # No guards on the modules: Dynamo put 7,861 of its 7,906 guards on a lowered
            # PAN's modules, and checking them took 4-5 ms of its 50 ms per call at
            # 128x128. The lowered modules are fixed once built (a changed attribute would
            # need lowering again anyway); the guards on the input's shape, dtype and
            # layout stay. Static by default, not Dynamo's automatic dynamic shapes (static
            # first, symbolic sizes from the second, as at cb4cc7c): symbolic-size kernels ran
            # 0-4 % slower, and upscaling Set14 with IMDN x4 took 304.7 s against 272.7
            # static (docs/performance.md, "Many input sizes").
            gm.compile(dynamic=self.dynamic, options={
                "cpp_wrapper": True,
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        islands = _float_ops(gm)
        return PassResult(gm, True, {"target": self.target, "integer_convs": lowered,
                                     "uint8_outputs": fused, "fused_residuals": residuals,
                                     "subpixel_deconvs": subpixel,
                                     "phase_major_shuffles": phase_major,
                                     "float_ops": ", ".join(islands), "guarded": first_input})

    def _lower_output(self, gm: fx.GraphModule, node: fx.Node, quantizer: Quantizer,
                      layer_cls: type) -> None:
        """A conv-output quantizer becomes its codes and their de-quantization for the float
        ops that read it; the codes fuse into the conv below (``_fuse_uint8_outputs``)."""
        if not isinstance(quantizer, UniformQuantizer) or quantizer.channels is not None \
                or quantizer.symmetric or quantizer.bits > 8:
            raise PassError(self.name, "a conv-output quantizer lowers when it is per-tensor, "
                            f"affine and of at most 8 bits; this one is {quantizer.describe()}",
                            node=node.name)
        codes = replace_module_node(gm, node, IntegerQuantize.from_quantizer(
            quantizer, layer_cls.channels_last), str(node.target).replace("_quantizer", "_codes"))
        insert_output_module(gm, codes, IntegerDequantize.from_quantizer(quantizer), "dequantize")

    def _convs_of(self, gm: fx.GraphModule, node: fx.Node, quantizer: Quantizer):
        """The QuantConv2d nodes and modules this activation quantizer feeds, after checking
        that they all lower."""
        act_bits = quantizer.bits
        if isinstance(quantizer, NonUniformQuantizer):
            if quantizer.integer_grid() is None:
                raise PassError(self.name, "non-uniform levels are free floats with no integer "
                                "form; set options.integer_grid = 8 (levels on a uint8 grid) "
                                f"to lower them; supported: {SUPPORTED}", node=node.name)
            act_bits = quantizer.integer_grid().bits
        elif not isinstance(quantizer, UniformQuantizer):
            raise PassError(self.name, f"{quantizer.kind} quantizer ({quantizer.describe()['mode']})"
                            f" has no integer kernel yet; supported: {SUPPORTED}", node=node.name)
        elif (quantizer.channels is not None and not quantizer.folded) or \
                not quantizer.bits <= 8 or quantizer.symmetric:
            raise PassError(self.name, f"activation quantizer is {quantizer.granularity}, "
                            f"{quantizer.bits} bits, {'symmetric' if quantizer.symmetric else 'affine'}"
                            f": the u8 kernels take per-tensor affine 2..8 bits, or per-channel "
                            f"steps folded into the convs (fold-input-scales); supported: "
                            f"{SUPPORTED}", node=node.name)
        elif quantizer.channels is not None and self.target == "gpu":
            raise PassError(self.name, "per-channel (folded) activation quantizers lower on "
                            "targets reference and cpu; the Triton kernel takes one zero point",
                            node=node.name)
        users = list(node.users)
        bad = [u for u in users if not isinstance(module_of(gm, u), QuantConv2d)
               or u.args[0] is not node or node in list(u.args[1:]) + list(u.kwargs.values())]
        if bad or not users:
            what = ", ".join(
                f"{u.name} ({type(module_of(gm, u)).__name__ if module_of(gm, u) else u.target})"
                for u in bad) or "nothing"
            raise PassError(self.name, f"quantized value feeds {what}, which has no integer "
                            f"kernel; supported: {SUPPORTED}", node=node.name)
        result = []
        for user in users:
            conv = gm.get_submodule(user.target)
            wq = conv.weight_quantizer
            if not isinstance(wq, (UniformQuantizer, ClippedWeightQuantizer)) or wq.bits > 8:
                raise PassError(self.name, f"weights of '{user.target}' use a {wq.kind} quantizer "
                                f"of {wq.describe()['bits']} bits; supported: {SUPPORTED}",
                                node=user.name)
            fan_in = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
            if accumulator_bound(fan_in, act_bits) > INT32_MAX:
                raise PassError(self.name, f"fan-in {fan_in} at {act_bits} bits can overflow "
                                "the int32 accumulator (bound K·(2^a − 1)·128 < 2^31)",
                                node=user.name)
            result.append((user, conv))
        return result

    @staticmethod
    def _add_guard(gm: fx.GraphModule, cpu_only: bool) -> str:
        """Route the first image input through an InputGuard sized from the first conv."""
        image = next(n for n in gm.graph.nodes if n.op == "placeholder")
        modules = (module_of(gm, n) for n in gm.graph.nodes)
        first = next((m for m in modules if isinstance(m, (nn.Conv2d, IntegerConv2d))), None)
        guard = InputGuard(first.in_channels if first is not None else None, cpu_only)
        gm.add_submodule("input_guard", guard)
        with gm.graph.inserting_after(image):
            checked = gm.graph.call_module("input_guard", (image,))
        image.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)
        return image.name


def _float_ops(gm: fx.GraphModule) -> list[str]:
    """The kinds of op left in float: every call that is not integer machinery."""
    integer = (InputGuard, IntegerQuantize, CodebookQuantize, DaqQuantize, SubsetQuantize,
               DaqConv2d, *TARGETS.values())
    names = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = module_of(gm, node)
        if module is None:
            module = method_owner(gm, node)
        if module is None:
            names.add(getattr(node.target, "__name__", str(node.target)))
        elif not isinstance(module, integer):
            names.add(type(module).__name__)
    return sorted(names)


def _fuse_residuals(gm: fx.GraphModule) -> int:
    """gpu: ``conv(q) + r`` with the conv's output read only by that add becomes
    ``conv(q, r)``, the add done in the kernel's epilogue (float addition commutes exactly).
    Symmetric-weight convs only (a centred one corrects its output after the kernel)."""
    fused = 0
    for node in list(gm.graph.nodes):
        conv = module_of(gm, node)
        if not isinstance(conv, GpuConv2d) or not conv.symmetric_weights or len(node.users) != 1:
            continue
        (add,) = node.users
        if not (add.op == "call_function" and add.target in (operator.add, torch.add)
                and len(add.args) == 2 and not add.kwargs and len(node.args) == 1):
            continue
        other = add.args[1] if add.args[0] is node else add.args[0]
        if other is node or not isinstance(other, fx.Node) \
                or _position(gm, other) > _position(gm, node):  # the residual must exist first
            continue
        node.args = (node.args[0], other)
        add.replace_all_uses_with(node)
        gm.graph.erase_node(add)
        fused += 1
    return fused


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return list(gm.graph.nodes).index(node)


def _fuse_uint8_outputs(gm: fx.GraphModule) -> int:
    """conv → [ReLU] → quantize, with the conv the value's only producer and the quantizer its
    only reader, becomes one conv emitting uint8 codes. Symmetric-weight convs only: the
    decision must follow from the recipe, not from weight values, so that a saved model
    rebuilds to the same graph."""
    fused = 0
    for node in list(gm.graph.nodes):
        conv = module_of(gm, node)
        if not isinstance(conv, (CpuConv2d, GpuConv2d)) or not conv.symmetric_weights \
                or len(node.users) != 1:
            continue
        (user,) = node.users
        relu = is_relu(gm, user) and len(user.users) == 1
        quantize_node = next(iter(user.users)) if relu else user
        quantize = module_of(gm, quantize_node)
        if not isinstance(quantize, IntegerQuantize) or quantize.channels is not None or \
                (conv.per_channel_input and any(conv.padding)):
            continue  # per-channel steps out, or a border correction after the conv: float
        conv.fuse_output(quantize, relu)
        quantize_node.replace_all_uses_with(node)
        gm.graph.erase_node(quantize_node)
        if relu:
            gm.graph.erase_node(user)
        fused += 1
    gm.delete_all_unused_submodules()
    return fused
