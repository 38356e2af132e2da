"""Sensitivity sweeps: how far the network output moves with one quantized layer.

:func:`sensitivity_sweep` quantizes one layer at a time (every other quantizer is switched
off with the quantizers' one mode switch, :func:`fxquant.quant.quant_mode`) and measures how
far the network output moves from the float output; ``strategy="all-but"`` does the converse
(all quantized but one). :func:`sensitivity_sweep_recompile` does the same by recompiling
with a recipe whose ``layers.include`` is the single layer, for methods where switching
quantizers off is not equivalent. Layers are those of
:func:`fxquant.analysis.quantized_layers`, scored as :func:`fxquant.analysis.layer_errors`
scores them; :func:`rank_agreement` compares the sweep's ranking with the isolated one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import fx, nn

# the analysis module's own helpers: one discovery of quantized layers, one SQNR accumulator
from fxquant.analysis import (
    LayerErrorReport, _ErrorAccumulator, _f, _first_tensor, _select, as_batches, psnr_db,
    quantized_layers, split_label,
)
from fxquant.quant.base import Quantizer, quant_mode

__all__ = ["LayerSensitivity", "SweepResult", "sensitivity_sweep", "sensitivity_sweep_recompile",
           "rank_agreement", "spearman"]

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerSensitivity:
    """Network output with only this layer quantized (``only``) or all but it (``all-but``).

    ``sqnr``/``psnr`` compare that output with the float model's output; ``psnr_target``
    with the targets (HR images) when given, and ``psnr_drop`` is the float model's target
    PSNR minus it.
    """

    layer: str
    index: int
    sqnr: float
    psnr: float
    psnr_target: float = float("nan")
    psnr_drop: float = float("nan")


@dataclass
class SweepResult:
    """Result of a sensitivity sweep. ``ranked()`` puts the most sensitive layer first:
    lowest output SQNR for ``only`` (quantizing it alone hurts most), highest for
    ``all-but`` (leaving it float helps most)."""

    strategy: str
    layers: list[LayerSensitivity]
    baseline_sqnr: float  # every layer quantized
    baseline_psnr: float

    def ranked(self) -> list[LayerSensitivity]:
        sign = 1.0 if self.strategy == "only" else -1.0
        return sorted(self.layers, key=lambda s: (sign * s.sqnr, s.index))

    def worst(self, k: int = 3) -> list[str]:
        return [s.layer for s in self.ranked()[:k]]

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "baseline_sqnr": self.baseline_sqnr,
                "baseline_psnr": self.baseline_psnr, "layers": [asdict(s) for s in self.layers]}

    def table(self, limit: int | None = None) -> str:
        what = "only this layer quantized" if self.strategy == "only" else \
            "all layers but this one quantized"
        rows = self.ranked()[:limit]
        header = ("rank", "layer", "output SQNR dB", "PSNR vs FP dB", "target PSNR drop dB")
        lines = [header] + [(str(i + 1), s.layer, _f(s.sqnr), _f(s.psnr), _f(s.psnr_drop))
                            for i, s in enumerate(rows)]
        if all(math.isnan(s.psnr_drop) for s in rows):  # no targets given
            lines = [line[:4] for line in lines]
            header = header[:4]
        widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
        text = "\n".join("  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                         for r in lines)
        return (f"sensitivity sweep ({what}); all quantized: output SQNR "
                f"{_f(self.baseline_sqnr)} dB, PSNR vs FP {_f(self.baseline_psnr)} dB\n"
                + text + "\n")


def _score(reference: list[torch.Tensor], outputs: list[torch.Tensor],
           targets: list[torch.Tensor] | None) -> tuple[float, float, float]:
    acc = _ErrorAccumulator()
    for r, o in zip(reference, outputs):
        acc.add(r, o)
    psnr = sum(psnr_db(r, o) for r, o in zip(reference, outputs)) / len(outputs)
    target = float("nan")
    if targets is not None:
        target = sum(psnr_db(t, o) for t, o in zip(targets, outputs)) / len(outputs)
    return acc.sqnr, psnr, target


def _run(fn: ModelFn, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_first_tensor(fn(b)).detach() for b in batches]


def sensitivity_sweep(float_model: nn.Module, quant_model: fx.GraphModule,
                      inputs: torch.Tensor | Sequence[torch.Tensor], *,
                      strategy: str = "only", targets: Sequence[torch.Tensor] | None = None,
                      float_fn: ModelFn | None = None, quant_fn: ModelFn | None = None,
                      layers: Sequence[str] | None = None,
                      progress: Callable[[str], None] | None = None) -> SweepResult:
    """Quantize one layer at a time by switching every other quantizer off.

    ``strategy="only"`` keeps only layer L's quantizers on; ``"all-but"`` switches only L's
    off. ``targets`` (HR tensors aligned with ``inputs``) add a PSNR drop against ground truth.
    Static quantizers were calibrated on float activations, so "only L on" is exactly the
    model a recipe quantizing L alone would build; :func:`sensitivity_sweep_recompile` checks
    that for methods where it may not hold. For one call of a shared module (``name@k``) its
    own input quantizer is toggled together with the module's weight quantizer, which every
    call shares.
    """
    if strategy not in ("only", "all-but"):
        raise ValueError(f"strategy must be 'only' or 'all-but', got {strategy!r}")
    batches = as_batches(inputs)
    tgt = as_batches(targets) if targets is not None else None
    quant_fn = quant_fn or quant_model
    reference = _run(float_fn or float_model, batches)
    base = _score(reference, _run(quant_fn, batches), tgt)
    float_target = _score(reference, reference, tgt)[2]
    found = _select(quantized_layers(quant_model), layers)
    all_quantizers = {n for n, m in quant_model.named_modules() if isinstance(m, Quantizer)}
    results = []
    for i, q in enumerate(found):
        if progress:
            progress(q.label)
        keep = set(q.quantizers) if strategy == "only" else all_quantizers - set(q.quantizers)
        with quant_mode(quant_model, "off", keep=keep):
            sqnr, psnr, target = _score(reference, _run(quant_fn, batches), tgt)
        results.append(LayerSensitivity(q.label, i, sqnr, psnr, target, float_target - target))
    return SweepResult(strategy, results, base[0], base[1])


def sensitivity_sweep_recompile(model: nn.Module, recipe, calib,
                                inputs: torch.Tensor | Sequence[torch.Tensor], *,
                                layers: Sequence[str],
                                targets: Sequence[torch.Tensor] | None = None,
                                concrete_args: dict | None = None,
                                float_fn: ModelFn | None = None) -> SweepResult:
    """Like :func:`sensitivity_sweep` (``only``), but compiles ``model`` once per layer with
    ``layers.include = [layer]`` (slower: one calibration per layer; exact for any method)."""
    import fxquant
    from fxquant.recipe import resolve_recipe

    base_recipe = resolve_recipe(recipe)
    batches = as_batches(inputs)
    tgt = as_batches(targets) if targets is not None else None
    reference = _run(float_fn or model, batches)
    float_target = _score(reference, reference, tgt)[2]
    full = fxquant.compile(model, base_recipe, calib=calib, concrete_args=concrete_args)
    base = _score(reference, _run(full, batches), tgt)
    results = []
    for i, layer in enumerate(layers):
        single = copy.deepcopy(base_recipe)
        single.layers.include = [split_label(layer)[0]]
        gm = fxquant.compile(model, single, calib=calib, concrete_args=concrete_args)
        sqnr, psnr, target = _score(reference, _run(gm, batches), tgt)
        results.append(LayerSensitivity(layer, i, sqnr, psnr, target, float_target - target))
    return SweepResult("only", results, base[0], base[1])


# ----------------------------------------------------------------------------- agreement
def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties broken by order; infinities clamped)."""
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(np.nan_to_num(np.asarray(a, float), posinf=1e9, neginf=-1e9),
                               kind="stable"), kind="stable")
    rb = np.argsort(np.argsort(np.nan_to_num(np.asarray(b, float), posinf=1e9, neginf=-1e9),
                               kind="stable"), kind="stable")
    return float(np.corrcoef(ra, rb)[0, 1])


def rank_agreement(errors: LayerErrorReport, sweep: SweepResult) -> dict:
    """How the sweep's ranking compares with the isolated per-layer SQNR ranking."""
    iso = [e.layer for e in errors.ranked("isolated")]
    swp = [s.layer for s in sweep.ranked()]
    by_sweep = {s.layer: s.sqnr for s in sweep.layers}
    common = [e for e in errors.layers if e.layer in by_sweep]
    return {
        "overlap3": len(set(iso[:3]) & set(swp[:3])),
        "overlap5": len(set(iso[:5]) & set(swp[:5])),
        "sweep_worst_isolated_rank": iso.index(swp[0]) + 1 if swp and swp[0] in iso else None,
        "isolated_worst_sweep_rank": swp.index(iso[0]) + 1 if iso and iso[0] in swp else None,
        "spearman": spearman([e.sqnr_isolated for e in common],
                             [by_sweep[e.layer] for e in common]),
    }
