"""Competitor variants of an SR model, for benchmarks against fxquant's own integer model.

Every ``build_X(model, example, calib, *, concrete_args=None)`` deep-copies the float model
(never touching the user's), and returns a :class:`Variant` whose ``fn`` runs one forward under
``torch.no_grad()`` on an NCHW float32 tensor, or raises :class:`VariantUnavailable` with a
one-line reason. ``concrete_args`` (CARN-M: ``{"scale": 4}``) are bound into a small wrapper
module, so eager, compiled, FX-traced and exported variants all see ``forward(x)``.

Dynamo and several models in one process: Dynamo caches compiled code per code object, so a
later model could reuse an earlier model's artifact. Checked with torch 2.13 / torchao 0.18, all
in one process: fp32_compile of a random FSRCNN x4, an EDSR-baseline x4, then a second FSRCNN
with other weights (same class, same code object); pt2e_int8 (weights frozen into the graph as
constants) of two such FSRCNNs and an EDSR-baseline; and all six variants of imdn, pan, carn_m,
fsrcnn x4 built one after another. Every compiled output matched its own model (fp32_compile:
<2e-6 from eager; pt2e_int8: within one int8 step of its convert_pt2e graph run eagerly, far
from the other FSRCNN's), and the earlier variants' outputs were unchanged after the later
builds. The pitfall did not bite: Dynamo lifts module parameters to graph inputs and guards
frozen ones by identity. So no ``torch._dynamo.reset()``, which would only make the earlier
variants recompile inside a timed call; tests/test_bench_variants.py keeps the same-class check.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxquant.errors import FxquantError
from fxquant.lower.int8_pairs import int8_pairs_saturate

__all__ = ["Variant", "VariantUnavailable", "BUILDERS", "build_variants", "build_fp32_eager",
           "build_fp32_channels_last", "build_fp32_compile", "build_bf16_autocast",
           "build_torch_ao_fx_int8", "build_pt2e_int8"]


@dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    note: str


class VariantUnavailable(FxquantError):
    """Variant ``name`` cannot be built for this model; ``reason`` says why in one line."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(f"variant {name!r} unavailable: {reason}")


class _Bound(nn.Module):
    """``forward(x)`` calling ``model(x, **concrete_args)``: fixes CARN-M's Python ``scale``."""

    def __init__(self, model: nn.Module, concrete_args: dict):
        super().__init__()
        self.model = model
        self.concrete_args = dict(concrete_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, **self.concrete_args)


def _copy(model: nn.Module, concrete_args: dict | None) -> nn.Module:
    m = copy.deepcopy(model).eval()
    return _Bound(m, concrete_args).eval() if concrete_args else m


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _no_grad(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return f(x)
    return fn


def _calibrate(m: Callable, example: torch.Tensor, calib: list[torch.Tensor] | None) -> None:
    with torch.no_grad():
        for x in (calib or [example]):
            m(x)


def build_fp32_eager(model, example, calib, *, concrete_args=None) -> Variant:
    m = _copy(model, concrete_args)
    return Variant("fp32_eager", _no_grad(m), "deepcopy of the float model, eager")


def build_fp32_channels_last(model, example, calib, *, concrete_args=None) -> Variant:
    m = _copy(model, concrete_args).to(memory_format=torch.channels_last)
    fn = _no_grad(lambda x: m(x.contiguous(memory_format=torch.channels_last)))
    return Variant("fp32_channels_last", fn, "eager, weights and input in channels_last")


def build_fp32_compile(model, example, calib, *, concrete_args=None) -> Variant:
    m = _copy(model, concrete_args)
    try:
        compiled = torch.compile(m)
        fn = _no_grad(compiled)
        fn(example)  # warm-up: pay the compile here, not inside the benchmark's timing
    except Exception as exc:  # noqa: BLE001 - any compiler failure makes the variant unavailable
        raise VariantUnavailable("fp32_compile", _first_line(exc)) from exc
    return Variant("fp32_compile", fn, "torch.compile (inductor, default mode), warmed once")


def build_bf16_autocast(model, example, calib, *, concrete_args=None) -> Variant:
    m = _copy(model, concrete_args)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x).float()
    return Variant("bf16_autocast", _no_grad(run), "eager under torch.autocast('cpu', bfloat16)")


def build_torch_ao_fx_int8(model, example, calib, *, concrete_args=None) -> Variant:
    name = "torch_ao_fx_int8"
    m = _copy(model, concrete_args)
    try:
        # torch.ao.quantization is deprecated in favour of torchao; keep the log clean.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
            torch.backends.quantized.engine = "x86"
            prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (example,))
            _calibrate(prepared, example, calib)
            q = convert_fx(prepared)
            with torch.no_grad():
                q(example)
    except Exception as exc:  # noqa: BLE001
        raise VariantUnavailable(name, _first_line(exc)) from exc
    return Variant(name, _no_grad(q), "torch.ao FX PTQ: x86 engine, default qconfig mapping, "
                                      f"{len(calib or [example])} calibration batches")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    """Raise ``names`` to ERROR for the block: torchao's import warns once per CUDA kernel
    library it cannot load on a CPU build, and torch's pytree about torchao's Enum constants."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _import_pt2e():
    """The torchao PT2E API; VariantUnavailable when torchao is missing."""
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
                X86InductorQuantizer, get_default_x86_inductor_quantization_config)
    except ImportError as exc:
        raise VariantUnavailable(
            "pt2e_int8", f"torchao is not installed ({_first_line(exc)}): "
                         "pip install 'fxquant[bench]'") from exc
    return prepare_pt2e, convert_pt2e, X86InductorQuantizer, get_default_x86_inductor_quantization_config


def _frozen(compiled: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call ``compiled`` with Inductor freezing on, restoring the global flags afterwards.

    Freezing folds the int8 weights into the graph, which the x86 int8 conv fusions need, and a
    call at a new input shape recompiles: with the flag set only around the warm-up, that
    recompile had no qconv fusions (torch._dynamo.utils.counters["inductor"]).
    ``torch.compile(options={"freezing": True})`` fails in torch 2.13 (UnsupportedOperator
    onednn.qconv_prepack). ``compiled`` must be static (``dynamic=False``): a dynamic-shape
    recompile with freezing fails for FSRCNN (qconv stride assertion). Each shape (and grad
    mode: no_grad vs inference_mode) compiles once, a Set5 PSNR pass needs ~7, so the
    recompile limit is 64 during calls, and past it a call raises instead of silently running
    the uncompiled reference graph. The flags cost ~1 us a call.
    """
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    def fn(x: torch.Tensor) -> torch.Tensor:
        saved = (inductor_config.freezing, dynamo_config.fail_on_recompile_limit_hit,
                 dynamo_config.recompile_limit)
        inductor_config.freezing = dynamo_config.fail_on_recompile_limit_hit = True
        dynamo_config.recompile_limit = max(saved[2], 64)
        try:
            with torch.no_grad():
                return compiled(x)
        finally:
            (inductor_config.freezing, dynamo_config.fail_on_recompile_limit_hit,
             dynamo_config.recompile_limit) = saved
    return fn


def build_pt2e_int8(model, example, calib, *, concrete_args=None) -> Variant:
    name = "pt2e_int8"
    prepare_pt2e, convert_pt2e, Quantizer, default_config = _import_pt2e()
    reduce_range = int8_pairs_saturate()
    m = _copy(model, concrete_args)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # H and W dynamic: calibration patches and benchmark images differ from `example`.
            # The batch size is dynamic too unless it is 1 (export specialises size-1 dims).
            # On failure export prints the partial graph to stderr; the reason line says enough.
            auto = torch.export.Dim.AUTO
            with contextlib.redirect_stderr(io.StringIO()), \
                    _quiet_loggers("torch.fx.experimental.symbolic_shapes",
                                   "torch._export.non_strict_utils"):
                exported = torch.export.export(
                    m, (example,), dynamic_shapes=({0: auto, 2: auto, 3: auto},)).module()
            # torchao's own advice for CPUs without VNNI, whose u8 × s8 pair sums saturate
            # (fxquant/lower/int8_pairs.py): 7-bit activations (reduce_range)
            config = default_config(reduce_range=reduce_range)
            prepared = prepare_pt2e(exported, Quantizer().set_global(config))
            _calibrate(prepared, example, calib)
            fn = _frozen(torch.compile(convert_pt2e(prepared), dynamic=False))
            fn(example)  # warm-up compile
    except Exception as exc:  # noqa: BLE001
        raise VariantUnavailable(name, _first_line(exc)) from exc
    config_name = "default config with reduce_range (7-bit activations: this CPU has no VNNI)" \
        if reduce_range else "default config"
    return Variant(name, fn, f"torchao PT2E: export, X86InductorQuantizer {config_name}, "
                             f"{len(calib or [example])} calibration batches, "
                             "torch.compile (static shapes) with Inductor freezing")


BUILDERS: dict[str, Callable[..., Variant]] = {
    "fp32_eager": build_fp32_eager,
    "fp32_channels_last": build_fp32_channels_last,
    "fp32_compile": build_fp32_compile,
    "bf16_autocast": build_bf16_autocast,
    "torch_ao_fx_int8": build_torch_ao_fx_int8,
    "pt2e_int8": build_pt2e_int8,
}


def build_variants(model: nn.Module, example: torch.Tensor, calib: list[torch.Tensor] | None,
                   names: list[str] | None = None, concrete_args: dict | None = None
                   ) -> tuple[list[Variant], dict[str, str]]:
    """Build ``names`` (default: all, in :data:`BUILDERS` order); returns (built, {name: reason})."""
    names = list(BUILDERS) if names is None else list(names)
    unknown = [n for n in names if n not in BUILDERS]
    if unknown:
        raise FxquantError(f"unknown variant(s) {', '.join(unknown)}; "
                           f"available: {', '.join(BUILDERS)}")
    built, unavailable = [], {}
    for n in names:
        try:
            built.append(BUILDERS[n](model, example, calib, concrete_args=concrete_args))
        except VariantUnavailable as exc:
            unavailable[n] = exc.reason
    return built, unavailable
