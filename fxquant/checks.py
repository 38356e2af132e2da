"""Checks ``fxquant.compile`` and ``fxquant.load`` run on what they are given, so that bad input
stops with an error naming the tensor or rule instead of yielding a silently wrong model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fxquant.errors import CheckpointError, FxquantError
from fxquant.pipeline import spec_name


def non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(name, count)`` of every floating-point tensor holding NaN or ±inf values."""
    bad = []
    for name, tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            count = int((~torch.isfinite(tensor.detach())).sum())
            if count:
                bad.append((name, count))
    return bad


def _listing(bad: list[tuple[str, int]]) -> str:
    shown = ", ".join(f"'{name}' ({count})" for name, count in bad[:5])
    return shown + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")


def _model_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


def check_model_finite(model: nn.Module) -> None:
    """Every parameter and buffer of the float model is finite: quantization ranges computed
    from a NaN weight are NaN, and so is every output."""
    bad = non_finite(_model_tensors(model))
    if bad:
        raise FxquantError(f"the model has NaN/inf values in {_listing(bad)} (tensor (count)); "
                           "quantizing it would give NaN outputs: fix or reload its weights")


def check_model_float32(model: nn.Module) -> None:
    """Every floating-point parameter and buffer is float32: the quantizers, the calibration
    data and the integer targets are float32, and a float64 or half model otherwise fails in
    its first conv with a dtype mismatch from deep inside torch."""
    other = [(name, t.dtype) for name, t in _model_tensors(model)
             if t.is_floating_point() and t.dtype != torch.float32]
    if other:
        shown = ", ".join(f"'{name}' ({str(dtype).replace('torch.', '')})"
                          for name, dtype in other[:5])
        raise FxquantError(f"fxquant quantizes float32 models; {shown}"
                           f"{f' and {len(other) - 5} more' if len(other) > 5 else ''} "
                           "are not float32: pass model.float()")


def check_state_finite(state: dict, source: str) -> None:
    """Every tensor of a saved compiled model is finite (an edited or corrupt file)."""
    bad = non_finite(state.items())
    if bad:
        raise CheckpointError(f"{source} holds NaN/inf values in {_listing(bad)} (tensor (count)): "
                              "the file is corrupt or was edited; compile the model again")


def _is_quantized_module(module: nn.Module) -> bool:
    from fxquant.lower.codebook import CodebookQuantize
    from fxquant.lower.conv import IntegerConv2d
    from fxquant.lower.daq import DaqQuantize
    from fxquant.lower.folded import DaqConv2d
    from fxquant.lower.uniform_codes import IntegerQuantize
    from fxquant.quant import QuantConv2d, Quantizer

    return isinstance(module, (Quantizer, QuantConv2d, IntegerConv2d, IntegerQuantize,
                               CodebookQuantize, DaqQuantize, DaqConv2d))


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the quantizers, quantized convs and integer kernels in ``model``."""
    return [name for name, m in model.named_modules() if _is_quantized_module(m)]


def check_compiled(model: object, action: str, error: type[FxquantError] = FxquantError) -> None:
    """``action`` (save, export, lower, ...) takes what :func:`fxquant.compile` or
    :func:`fxquant.load` returned: the recipe it carries says how to rebuild or lower it."""
    if not hasattr(model, "fxquant_recipe"):
        raise error(f"{action} takes a model compiled by fxquant.compile (or fxquant.load); "
                    f"got a {type(model).__name__} without a recipe")


def check_not_compiled(model: nn.Module) -> None:
    """``compile`` takes the float model: a compiled one would be quantized a second time."""
    found = quantized_modules(model)
    recipe = getattr(model, "fxquant_recipe", None)
    if found or recipe is not None:
        what = f"recipe '{recipe.name}'" if recipe is not None else "quantizer modules"
        example = f", e.g. '{found[0]}'" if found else ""
        raise FxquantError(f"the model is already compiled by fxquant ({what}{example}); pass "
                           "the float network to fxquant.compile, or keep the compiled one as "
                           "it is: compiling it again would quantize twice")


def explain_unquantized(pipeline: str, history: list, skipped: dict | None) -> str:
    """Why a compile produced no quantized layer: the pipeline, or the layer rules."""
    passes = [spec_name(spec) for spec, _ in history]
    if skipped is None:
        return (f"the pipeline '{pipeline}' inserts no quantizer (passes run: "
                f"{', '.join(passes)}); add a quantizing pass such as observe,calibrate,quantize")
    if not skipped:
        return ("the model has no layer fxquant can quantize (no Conv2d; supported: conv2d)")
    reasons: dict[str, list[str]] = {}
    for node, reason in skipped.items():
        reasons.setdefault(reason, []).append(node)
    parts = [f"{len(nodes)} {reason} (e.g. {nodes[0]})" for reason, nodes in reasons.items()]
    return "every layer was left out by the recipe's layer rules: " + "; ".join(parts)


def check_quantized(gm: nn.Module, pipeline: str, history: list, skipped: dict | None) -> None:
    if not quantized_modules(gm):
        raise FxquantError(f"nothing was quantized: {explain_unquantized(pipeline, history, skipped)}"
                           ". Pass allow_unquantized=True to accept a float result.")
