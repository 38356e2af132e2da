"""One self-contained HTML report on a quantized SR model: where it loses quality, and why.

``fxquant report --model imdn --scale 4 --recipe minmax-w4a4 --datasets Set5 --out r.html``
(or ``--compiled m.fxq``) writes a single HTML file with every image and plot embedded as a
``data:`` URI (no URL, no script from the network; it opens offline). It leads with what
people look at and folds the details away (``<details>``):

1. the headline: FP vs quantized PSNR/SSIM per dataset with ΔPSNR, and the speed of the
   lowered integer model against FP32 eager when the recipe lowers (a short interleaved CPU
   timing of ``fxquant.lowered_copy(gm, "cpu")`` on a small input, ``speed``; recipes that do
   not lower get a one-line note and no number);
2. image crops: HR, bicubic, FP, quantized, and the error maps |FP − quant| and |HR − quant|;
3. per-layer error attribution (:func:`fxquant.analysis.layer_errors`): a bar chart of every
   quantized layer's isolated SQNR (worst highlighted) with the propagated SQNR; the tables
   with each layer's quantizers are folded;
4. the sensitivity sweep (:func:`fxquant.sensitivity.sensitivity_sweep`): output SQNR with one
   layer quantized at a time and how well it agrees with the per-layer ranking (ranking
   table folded);
5. distributions (:mod:`fxquant.distributions`) of the worst layers' inputs, with the
   activation quantizer's clipping range;
6. the graph, drawn as SVG with layers coloured by their SQNR (folded);
7. the recipe (TOML) and the pass pipeline (folded).

Without matplotlib the charts are left out and one notice at the top says so. Analysis runs
on small LR crops of the first images of the first dataset (``crop``, ``analysis_images``)
so the report takes tens of seconds on a CPU.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fxquant.analysis import LayerErrorReport, benchmark_crops, layer_errors
from fxquant.files import atomic_write_text
from fxquant.report_html import _plot_available
from fxquant.report_sections import Measured, ViewedImage, page_html
from fxquant.sensitivity import SweepResult, rank_agreement, sensitivity_sweep

__all__ = ["ReportConfig", "Report", "build_report", "measure_report", "write_report",
           "load_models", "measure_speed"]


@dataclass
class ReportConfig:
    """What the report computes. ``crop`` is the side of the centred LR crop the analyses
    use (0: whole images); ``worst`` the number of layers highlighted and plotted; ``speed``
    times the lowered integer model against FP32 eager on a 1×C×``speed_size``² LR input
    (``speed_rounds`` interleaved rounds) when the recipe lowers."""

    datasets: list[str] = field(default_factory=lambda: ["Set5"])
    limit: int | None = None
    analysis_images: int = 2
    crop: int = 48
    worst: int = 3
    sweep: bool = True
    sweep_strategy: str = "only"
    view_images: int = 2
    view_crop: int = 128
    graph: bool = True
    speed: bool = True
    speed_size: int = 64
    speed_rounds: int = 5


@dataclass
class Report:
    """The HTML text and the numbers behind it (``data`` is JSON-serialisable)."""

    html: str
    data: dict
    errors: LayerErrorReport | None = None
    sweep: SweepResult | None = None

    def summary(self) -> str:
        """A few lines for the terminal: quality, worst layers, sweep ranking."""
        d = self.data
        lines = [f"{d['model']} x{d['scale']}, recipe {d['recipe_name']}"]
        for ds, r in d["quality"].items():
            lines.append(f"  {ds}: FP {r['fp']['psnr']:.3f} dB / quantized {r['quant']['psnr']:.3f}"
                         f" dB (ΔPSNR {r['quant']['psnr'] - r['fp']['psnr']:+.3f}), SSIM "
                         f"{r['fp']['ssim']:.4f} / {r['quant']['ssim']:.4f}")
        if self.errors is not None:
            worst = self.errors.ranked("isolated")[:d["config"]["worst"] + 2]
            lines.append("  worst layers (isolated SQNR): " + ", ".join(
                f"{e.layer} {e.sqnr_isolated:.2f} dB" for e in worst))
        if self.sweep is not None:
            ranked = self.sweep.ranked()[:d["config"]["worst"] + 2]
            lines.append("  sensitivity sweep (output SQNR, one layer quantized): " + ", ".join(
                f"{s.layer} {s.sqnr:.2f} dB" for s in ranked))
            agree = d.get("agreement")
            if agree:
                lines.append(f"  agreement: top-5 overlap {agree['overlap5']}/5, sweep's worst "
                             f"layer is #{agree['sweep_worst_isolated_rank']} by isolated SQNR, "
                             f"Spearman {agree['spearman']:.2f}")
        speed = d.get("speed") or {}
        if speed.get("status") == "measured":
            lines.append(f"  speed: lowered {speed['lowered_ms']:.1f} ms vs FP32 eager "
                         f"{speed['fp32_ms']:.1f} ms ({speed['ratio']:.2f}x) on "
                         f"{speed['size']}x{speed['size']} LR, {speed['how']}")
        elif speed.get("reason"):
            lines.append(f"  speed: not measured ({speed['reason']})")
        if d.get("timings_s"):
            lines.append("  time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                   d["timings_s"].items()))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- models
def load_models(*, model: str | None = None, scale: int | None = None, recipe=None,
                compiled: str | os.PathLike | None = None, data_root=None, checkpoint=None):
    """FP and quantized zoo models, from a saved compiled model or by compiling ``model`` at
    ``scale`` with ``recipe`` (what ``fxquant report`` and the ``tools/`` scripts accept)."""
    from fxquant.errors import FxquantError
    from fxquant.workflow import load_compiled, prepare, refuse_with_compiled

    if compiled:  # checkpoint: the float reference's weights
        refuse_with_compiled(recipe=recipe)
        return load_compiled(compiled, model=model, scale=scale, data_root=data_root,
                             weights=checkpoint)
    if not (model and scale and recipe):
        raise FxquantError("give --compiled FILE, or --model, --scale and --recipe")
    return prepare(model, scale, recipe, data_root=data_root, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- speed
def _is_lowered(gm) -> bool:
    from fxquant.lower.guard import InputGuard

    return any(isinstance(m, InputGuard) for m in gm.modules())


def measure_speed(models, *, size: int = 64, rounds: int = 5) -> dict:
    """FP32 eager vs the lowered integer model (``lower{target=cpu}``, eager, no Inductor)
    on one random 1×C×``size``² LR input, ``rounds`` interleaved rounds after warm-up
    (:func:`fxquant.bench.interleaved`). ``status`` is ``measured``, ``not lowerable`` (the
    recipe has no integer form; ``reason`` says why) or ``failed``; no number is made up."""
    import fxquant
    from fxquant.bench import interleaved, summarize
    from fxquant.errors import FxquantError
    from fxquant.workflow import as_sr_function

    gm = models.quant_model
    if _is_lowered(gm):
        lowered, how = gm, "the model as given (already lowered)"
    else:
        try:
            lowered = fxquant.lowered_copy(gm, "cpu")
        except FxquantError as exc:
            reason = str(exc).splitlines()[0].split("; supported:")[0]
            return {"status": "not lowerable", "reason": f"the recipe does not lower: {reason}"}
        how = "lower{target=cpu}, eager (no Inductor)"
    channels = models.spec.channels
    x = torch.rand(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    fp_fn = models.runner("fp")
    low_fn = as_sr_function(lowered, models.spec, models.scale)
    try:
        times = interleaved({"fp32_eager": lambda: fp_fn(x), "lowered": lambda: low_fn(x)},
                            rounds)
    except Exception as exc:  # noqa: BLE001 - an optional measurement must not sink the report
        return {"status": "failed",
                "reason": f"timing failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"}
    fp_row, low_row = summarize("", times)
    return {"status": "measured", "fp32_ms": fp_row.median_ms, "lowered_ms": low_row.median_ms,
            "ratio": low_row.ratio, "ratio_min": low_row.ratio_min,
            "ratio_max": low_row.ratio_max, "size": size, "channels": channels,
            "rounds": rounds, "threads": torch.get_num_threads(), "how": how}


def measure_report(models, *, name: str, config: ReportConfig, data_root=None,
                   progress: Callable[[str], None] | None = None) -> Measured:
    """Evaluate and analyse ``models`` (a :class:`~fxquant.workflow.ZooModels`): everything
    the page shows, with the seconds each phase took in ``data["timings_s"]``."""
    from fxquant.data import BenchmarkSet
    from fxquant.distributions import activation_stats
    from fxquant.workflow import evaluate_sets

    timings: dict[str, float] = {}
    clock = [time.perf_counter(), ""]

    def say(message: str, phase: str = "") -> None:
        now = time.perf_counter()
        if clock[1]:
            timings[clock[1]] = round(now - clock[0], 2)
        clock[0], clock[1] = now, phase
        if progress is not None and message:
            progress(message)

    spec, scale, gm = models.spec, models.scale, models.quant_model
    fp_fn, q_fn = models.runner("fp"), models.runner("quant")
    data: dict = {"model": name, "scale": scale, "recipe_name": models.recipe.name,
                  "pipeline": getattr(gm, "fxquant_pipeline", ""),
                  "config": dict(config.__dict__), "quality": {}}

    say("evaluating FP and quantized models", "quality")
    scores = {which: evaluate_sets(fn, spec, scale, config.datasets, data_root=data_root,
                                   limit=config.limit) for which, fn in (("fp", fp_fn),
                                                                         ("quant", q_fn))}
    for ds in config.datasets:
        f, q = scores["fp"][ds], scores["quant"][ds]
        data["quality"][ds] = {"fp": {"psnr": f.psnr, "ssim": f.ssim},
                               "quant": {"psnr": q.psnr, "ssim": q.ssim},
                               "images": len(f.images)}
    if config.speed:
        say(f"timing FP32 eager vs the lowered model ({config.speed_size}×{config.speed_size} "
            "LR input)", "speed")
        data["speed"] = measure_speed(models, size=config.speed_size, rounds=config.speed_rounds)

    inputs, labels = benchmark_crops(config.datasets[0], scale, images=config.analysis_images,
                                     crop=config.crop, color=spec.color, root=data_root)
    crop_note = (f"centred {config.crop}×{config.crop} LR crops of " if config.crop else "") + \
        f"{', '.join(labels)} ({config.datasets[0]})"
    say(f"per-layer error attribution on {crop_note}", "attribution")
    errors = layer_errors(models.float_model, gm, inputs, float_fn=fp_fn, quant_fn=q_fn)
    worst = [e.layer for e in errors.ranked("isolated")[:config.worst]]
    data["layers"], data["worst"] = errors.to_dict(), worst
    measured = Measured(data, crop_note, errors, worst,
                        graph_module=gm if config.graph else None)

    if config.sweep:
        say(f"sensitivity sweep over {len(errors.layers)} layers", "sweep")
        measured.sweep = sensitivity_sweep(models.float_model, gm, inputs,
                                           strategy=config.sweep_strategy, float_fn=fp_fn,
                                           quant_fn=q_fn)
        data["sweep"] = measured.sweep.to_dict()
        data["agreement"] = rank_agreement(errors, measured.sweep)

    say(f"activation distributions of {', '.join(worst)}", "distributions")
    measured.stats = activation_stats(models.float_model, inputs, worst, where="input",
                                      fn=fp_fn, quant_model=gm, labels=labels)
    data["distributions"] = {
        layer: {"lo": s.lo, "hi": s.hi, "clip": s.clip, "clipped_fraction": s.clipped_fraction()}
        for layer, s in ((layer, measured.stats[layer]) for layer in worst)}

    say("image crops", "images")
    dataset = BenchmarkSet(config.datasets[0], scale, root=data_root,
                           limit=max(config.view_images, 1))
    measured.images = [viewed_image(dataset[i], spec.color, scale, fp_fn, q_fn)
                       for i in range(min(len(dataset), config.view_images))]
    say("", "")
    data["timings_s"] = timings
    return measured


def viewed_image(pair, color: str, scale: int, fp_fn, q_fn) -> ViewedImage:
    """One benchmark pair super-resolved by both models, with bicubic, and scored."""
    from fxquant.data import bicubic_upscale
    from fxquant.evaluate import score_image, super_resolve
    from fxquant.metrics import rgb_to_y

    fp_img = super_resolve(fp_fn, pair.lr, color)
    q_img = super_resolve(q_fn, pair.lr, color)
    bicubic = bicubic_upscale(pair.lr, scale)
    hr = pair.hr
    if color == "y":
        hr, bicubic = rgb_to_y(pair.hr), rgb_to_y(bicubic)
    scores = {which: score_image(img, pair.hr, scale)
              for which, img in (("bicubic", bicubic), ("fp", fp_img), ("quant", q_img))}
    return ViewedImage(pair.name, hr, bicubic, fp_img, q_img, scores)


def build_report(models, *, model_name: str | None = None, config: ReportConfig | None = None,
                 data_root=None, progress: Callable[[str], None] | None = None) -> Report:
    """Measure ``models`` (:func:`measure_report`) and render the page from the numbers."""
    import fxquant

    config = config or ReportConfig()
    name = model_name or models.spec.name
    measured = measure_report(models, name=name, config=config, data_root=data_root,
                              progress=progress)
    page = page_html(measured, models.recipe, config, name=name, scale=models.scale,
                     plots=_plot_available(), version=fxquant.__version__)
    return Report(page, measured.data, measured.errors, measured.sweep)


def write_report(path: str | os.PathLike, models, **kwargs) -> Report:
    """:func:`build_report` and write the HTML to ``path``."""
    report = build_report(models, **kwargs)
    atomic_write_text(path, report.html, "report")
    return report
