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

import datetime
import html
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from fxquant.analysis import LayerErrorReport, benchmark_crops, layer_errors
from fxquant.errors import CheckpointError
from fxquant.files import atomic_write_text
from fxquant.report_html import (  # the page's HTML pieces
    NO_MATPLOTLIB,
    _CSS,
    _as_display,
    _bar_chart,
    _centre,
    _e,
    _fmt,
    _fold,
    _heat,
    _plot_available,
    _png_uri,
    _quality_card,
    _section,
    _speed_html,
    _table,
)
from fxquant.sensitivity import SweepResult, rank_agreement, sensitivity_sweep

__all__ = ["ReportConfig", "Report", "build_report", "write_report", "models_from_compiled",
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
def models_from_compiled(path: str | os.PathLike, *, data_root=None, checkpoint=None):
    """A :class:`~fxquant.workflow.ZooModels` from a saved compiled model: the float network
    is the zoo model named in the file (pretrained, or ``checkpoint``)."""
    import fxquant
    from fxquant.compiler import read_compiled
    from fxquant.models import build_model, get_spec
    from fxquant.workflow import ZooModels

    payload = read_compiled(path)
    info = payload["model"]
    if not info.get("name"):
        raise CheckpointError(f"{path} names no zoo model; a report needs the float network")
    name, scale = info["name"], info["scale"]
    float_model = build_model(name, scale, pretrained=checkpoint is None, checkpoint=checkpoint,
                              data_root=data_root)
    quant = fxquant.load(path, build_model(name, scale, data_root=data_root), data_root=data_root)
    return ZooModels(get_spec(name), scale, quant.fxquant_recipe, float_model, quant)


def load_models(*, model: str | None = None, scale: int | None = None, recipe=None,
                compiled: str | os.PathLike | None = None, data_root=None, checkpoint=None):
    """FP and quantized zoo models, from a saved compiled model or by compiling ``model`` at
    ``scale`` with ``recipe`` (what ``fxquant report`` and the ``tools/`` scripts accept)."""
    from fxquant.errors import FxquantError
    from fxquant.workflow import prepare

    if compiled:
        models = models_from_compiled(compiled, data_root=data_root, checkpoint=checkpoint)
        if model and model != models.spec.name:
            raise FxquantError(f"--model {model} does not match {compiled}, which holds "
                               f"{models.spec.name}")
        return models
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
    channels = 1 if models.spec.color == "y" else 3
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


def build_report(models, *, model_name: str | None = None, config: ReportConfig | None = None,
                 data_root=None, progress: Callable[[str], None] | None = None) -> Report:
    """Evaluate, analyse and render ``models`` (a :class:`~fxquant.workflow.ZooModels`)."""
    import fxquant
    from fxquant.data import BenchmarkSet, bicubic_upscale
    from fxquant.evaluate import score_image, super_resolve
    from fxquant.metrics import rgb_to_y
    from fxquant.workflow import evaluate_sets

    config = config or ReportConfig()
    timings: dict[str, float] = {}
    clock = [time.perf_counter(), ""]

    def say(message: str, phase: str = "") -> None:
        now = time.perf_counter()
        if clock[1]:
            timings[clock[1]] = round(now - clock[0], 2)
        clock[0], clock[1] = now, phase
        if progress is not None and message:
            progress(message)

    spec, scale, recipe = models.spec, models.scale, models.recipe
    name = model_name or spec.name
    gm = models.quant_model
    fp_fn, q_fn = models.runner("fp"), models.runner("quant")
    plots = _plot_available()
    data: dict = {"model": name, "scale": scale, "recipe_name": recipe.name,
                  "pipeline": getattr(gm, "fxquant_pipeline", ""),
                  "config": dict(config.__dict__), "quality": {}}

    # 1. quality -----------------------------------------------------------------------
    say("evaluating FP and quantized models", "quality")
    fp_scores = evaluate_sets(fp_fn, spec, scale, config.datasets, data_root=data_root,
                              limit=config.limit)
    q_scores = evaluate_sets(q_fn, spec, scale, config.datasets, data_root=data_root,
                             limit=config.limit)
    cards = []
    for ds in config.datasets:
        f, q = fp_scores[ds], q_scores[ds]
        data["quality"][ds] = {"fp": {"psnr": f.psnr, "ssim": f.ssim},
                               "quant": {"psnr": q.psnr, "ssim": q.ssim},
                               "images": len(f.images)}
        cards.append(_quality_card(ds, len(f.images), f.psnr, q.psnr, f.ssim, q.ssim))
    quality_html = ('<div class="cards">' + "".join(cards) + "</div>"
                    '<p class="note">PSNR/SSIM on the Y channel, borders of '
                    f'{scale} pixels shaved' + (f"; first {config.limit} images per set"
                                                if config.limit else "") + ".</p>")

    speed = None
    if config.speed:
        say(f"timing FP32 eager vs the lowered model ({config.speed_size}×{config.speed_size} "
            "LR input)", "speed")
        speed = measure_speed(models, size=config.speed_size, rounds=config.speed_rounds)
        data["speed"] = speed

    # 2. analysis inputs ----------------------------------------------------------------
    dataset = BenchmarkSet(config.datasets[0], scale, root=data_root,
                           limit=max(config.view_images, 1))
    pairs = [dataset[i] for i in range(len(dataset))]
    inputs, labels = benchmark_crops(config.datasets[0], scale, images=config.analysis_images,
                                     crop=config.crop, color=spec.color, root=data_root)
    crop_note = (f"centred {config.crop}×{config.crop} LR crops of " if config.crop else "") + \
        f"{', '.join(labels)} ({config.datasets[0]})"

    say(f"per-layer error attribution on {crop_note}", "attribution")
    errors = layer_errors(models.float_model, gm, inputs, float_fn=fp_fn, quant_fn=q_fn)
    ranked = errors.ranked("isolated")
    worst = [e.layer for e in ranked[:config.worst]]
    data["layers"] = errors.to_dict()
    data["worst"] = worst
    names = [e.layer for e in errors.layers]
    attribution_html = (
        "<p><b>Layers that lose most</b> (isolated SQNR): " + _e(", ".join(
            f"{e.layer} ({_fmt(e.sqnr_isolated)} dB)" for e in ranked[:config.worst])) + ".</p>"
        f"<p class=\"note\">Each quantized layer's output is compared with the float layer of the same name on "
        f"{_e(crop_note)}. <b>Isolated</b>: the quantized layer is fed the float model's input "
        "(its local error, split into weight-only and activation-only parts). "
        "<b>Propagated</b>: the quantized model runs on its own activations (the error "
        "accumulated up to that layer). Network output: SQNR "
        f"{_fmt(errors.output_sqnr)} dB, PSNR against the FP output "
        f"{_fmt(errors.output_psnr)} dB.</p>")
    if plots:
        attribution_html += (
            '<img class="plot" alt="per-layer SQNR" src="' + _bar_chart(
                names, [e.sqnr_isolated for e in errors.layers], set(worst),
                title=f"isolated SQNR per quantized layer (worst {config.worst} in red)",
                ylabel="SQNR (dB)", first_label="isolated",
                second=[e.sqnr_propagated for e in errors.layers],
                second_label="propagated") + '">')
    if errors.transformed:
        attribution_html += (
            '<p class="note"><b>Warning:</b> a pass changed the weights of '
            f"{_e(', '.join(errors.transformed))} (e.g. fold-channel-norm folds scales into "
            "them): their outputs are rescaled, so their per-layer numbers and those of the "
            "layers they feed do not measure quantization error alone. The sensitivity sweep "
            "is unaffected when the folding is exact.</p>")
    top = ranked[:max(10, config.worst)]
    attribution_html += _fold(
        f"worst {len(top)} layers by isolated SQNR, with their quantizers", _table(
        ["layer", "module", "quantizer", "isolated dB", "weight-only dB", "activation-only dB",
         "propagated dB", "isolated MSE"],
        [[e.layer, e.module_type, e.quantizer, _fmt(e.sqnr_isolated), _fmt(e.sqnr_weight_only),
          _fmt(e.sqnr_activation_only), _fmt(e.sqnr_propagated), f"{e.mse_isolated:.3g}"]
         for e in top], set(range(config.worst))))
    attribution_html += _fold("all layers in graph order", "<pre>" + _e(errors.table())
                              + "</pre>")

    # 3. sensitivity --------------------------------------------------------------------
    sweep = None
    sweep_html = '<p class="note">sweep not run (--no-sweep).</p>'
    if config.sweep:
        say(f"sensitivity sweep over {len(errors.layers)} layers", "sweep")
        sweep = sensitivity_sweep(models.float_model, gm, inputs, strategy=config.sweep_strategy,
                                  float_fn=fp_fn, quant_fn=q_fn)
        agreement = rank_agreement(errors, sweep)
        data["sweep"] = sweep.to_dict()
        data["agreement"] = agreement
        sranked = sweep.ranked()
        sworst = {s.layer for s in sranked[:config.worst]}
        iso_rank = {e.layer: i + 1 for i, e in enumerate(ranked)}
        what = ("only this layer quantized, every other quantizer switched off"
                if sweep.strategy == "only" else "every layer quantized except this one")
        sweep_html = (
            "<p><b>Most sensitive layers</b> (output SQNR): " + _e(", ".join(
                f"{s.layer} ({_fmt(s.sqnr)} dB)" for s in sranked[:config.worst])) + ".</p>"
            f"<p class=\"note\">Network output with {what}, against the FP output on the same crops. With all "
            f"layers quantized the output SQNR is {_fmt(sweep.baseline_sqnr)} dB.</p>")
        if plots:
            sweep_html += '<img class="plot" alt="sensitivity sweep" src="' + _bar_chart(
                [s.layer for s in sweep.layers], [s.sqnr for s in sweep.layers], sworst,
                title=f"output SQNR with one layer quantized (most sensitive {config.worst} "
                      "in red)", ylabel="output SQNR (dB)") + '">'
        ranking = _table(
            ["rank", "layer", "output SQNR dB", "PSNR vs FP dB", "rank by isolated SQNR"],
            [[i + 1, s.layer, _fmt(s.sqnr), _fmt(s.psnr), iso_rank.get(s.layer, "-")]
             for i, s in enumerate(sranked[:max(10, config.worst)])], set(range(config.worst)))
        sweep_html += (
            f"<p>Agreement with the isolated per-layer ranking: top-3 overlap "
            f"{agreement['overlap3']}/3, top-5 overlap {agreement['overlap5']}/5; the sweep's most "
            f"sensitive layer is #{agreement['sweep_worst_isolated_rank']} by isolated SQNR and "
            "the "
            f"worst isolated layer is #{agreement['isolated_worst_sweep_rank']} in the sweep; "
            f"Spearman rank correlation {agreement['spearman']:.2f}. The two differ where a "
            "layer's local error is damped (or not) on its way to the output: a layer writing "
            "straight into the residual trunk or the upsampler passes its error on undamped, "
            "while a branch gated by attention or mixed with many other channels damps it.</p>")
        sweep_html += _fold(f"ranking of the {min(len(sranked), max(10, config.worst))} most "
                            "sensitive layers", ranking)

    # 4. distributions (statistics need no matplotlib; the plots do) ----------------------
    from fxquant.distributions import activation_stats

    say(f"activation distributions of {', '.join(worst)}", "distributions")
    stats = activation_stats(models.float_model, inputs, worst, where="input", fn=fp_fn,
                             quant_model=gm, labels=labels)
    data["distributions"] = {}
    dist_html = ""
    for layer in worst:
        s = stats[layer]
        no_range = "" if s.clip is not None else (
            " The quantizer in front of this layer has no static range (it is dynamic, "
            "non-uniform or per-channel).")
        dist_html += f"<h3>{_e(layer)}</h3><p>{_e(s.summary() + no_range)}</p>"
        if plots:
            from fxquant.distributions import figure_to_png, plot_activation, png_data_uri

            dist_html += (f'<img class="plot" alt="distribution of {_e(layer)} input" src="'
                          f'{png_data_uri(figure_to_png(plot_activation(s)))}">')
        data["distributions"][layer] = {"lo": s.lo, "hi": s.hi, "clip": s.clip,
                                        "clipped_fraction": s.clipped_fraction()}
    dist_html = ("<p class=\"note\">Inputs of the worst layers in the float model"
                 + (", per channel for each image (bar: min..max, box: mean±std) and as a "
                    "histogram; dashed lines are the range of the activation quantizer in front "
                    "of the layer." if plots else "; the range of the activation quantizer in "
                    "front of the layer and the share of values it clips.") + "</p>"
                 + dist_html)

    # 5. image crops ---------------------------------------------------------------------
    say("image crops", "images")
    crops_html = ""
    for pair in pairs[:config.view_images]:
        fp_img = super_resolve(fp_fn, pair.lr, spec.color)
        q_img = super_resolve(q_fn, pair.lr, spec.color)
        hr = pair.hr if spec.color != "y" else rgb_to_y(pair.hr)
        bicubic = bicubic_upscale(pair.lr, scale)
        if spec.color == "y":
            bicubic = rgb_to_y(bicubic)
        fp_score = score_image(fp_img, pair.hr, scale)
        q_score = score_image(q_img, pair.hr, scale)
        bic_score = score_image(bicubic, pair.hr, scale)
        diff_fq = np.abs(fp_img.astype(np.float64) - q_img.astype(np.float64))
        diff_hq = np.abs(hr.astype(np.float64) - q_img.astype(np.float64))
        if diff_fq.ndim == 3:
            diff_fq, diff_hq = diff_fq.mean(axis=2), diff_hq.mean(axis=2)
        top_err = float(np.percentile(np.concatenate([_centre(diff_fq, config.view_crop).ravel(),
                                                      _centre(diff_hq, config.view_crop).ravel()]),
                                      99.5)) or 1.0
        panels = [("HR", _as_display(hr), ""),
                   ("bicubic", _as_display(bicubic), f"{bic_score[0]:.2f} dB"),
                   ("FP", _as_display(fp_img), f"{fp_score[0]:.2f} dB"),
                   ("quantized", _as_display(q_img), f"{q_score[0]:.2f} dB"),
                   ("|FP − quant|", _heat(diff_fq, top_err), f"0..{top_err:.0f}/255"),
                   ("|HR − quant|", _heat(diff_hq, top_err), f"0..{top_err:.0f}/255")]
        figures = "".join(
            f'<figure><img alt="{_e(pair.name)} {_e(t)}" '
            f'src="{_png_uri(_centre(a, config.view_crop))}">'
            f"<figcaption>{_e(t)}<br>{_e(c)}</figcaption></figure>" for t, a, c in panels)
        crops_html += (f"<h3>{_e(pair.name)}</h3><p class=\"note\">centre {config.view_crop}×"
                       f"{config.view_crop} HR crop; PSNR of the whole image; error maps share "
                       "one colour scale (black 0, white = the 99.5th percentile).</p>"
                       f'<div class="crops">{figures}</div>')

    # 6. graph ----------------------------------------------------------------------------
    graph_html = ""
    say("", "graph")
    if config.graph:
        from fxquant.graphviz import legend_html, to_svg

        sqnr = errors.sqnr_map("isolated", key="node")
        graph_html = ("<details><summary>show the graph (quantized layers coloured by isolated "
                      "SQNR; hover a node for details)</summary>" + legend_html(gm, sqnr)
                      + '<div class="graph">' + to_svg(gm, errors=sqnr, standalone=False,
                                                       id_prefix="report")
                      + "</div></details>")

    # page ----------------------------------------------------------------------------------
    say("", "")
    data["timings_s"] = timings
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    toml = recipe.to_toml()
    title = f"fxquant report: {name} ×{scale}, recipe {recipe.name}"
    recipe_html = _fold(f"recipe {recipe.name} (TOML) and the pass pipeline",
                        f"<pre>{html.escape(toml, quote=False)}</pre>"
                        f"<p>pipeline <code>{_e(data['pipeline'])}</code></p>")
    body = (f"<h1>{_e(title)}</h1>"
            f'<p class="note">{_e(when)} · fxquant {_e(fxquant.__version__)} · torch '
            f"{_e(torch.__version__)}</p>"
            + ("" if plots else f'<p class="notice">{_e(NO_MATPLOTLIB)}</p>')
            + _section("Quality and speed", quality_html + _speed_html(speed),
                       "headline")
            + _section("Images", crops_html, "images")
            + _section("Per-layer error", attribution_html, "layers")
            + _section("Sensitivity sweep", sweep_html, "sweep")
            + _section("Distributions of the worst layers' inputs", dist_html, "distributions")
            + (_section("Graph", graph_html, "graph") if graph_html else "")
            + _section("Recipe", recipe_html, "recipe")
            + '<p class="note">time (s): ' + _e(", ".join(f"{k} {v:.1f}" for k, v in
                                                         timings.items())) + "</p>")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")
    return Report(page, data, errors, sweep)


def write_report(path: str | os.PathLike, models, **kwargs) -> Report:
    """:func:`build_report` and write the HTML to ``path``."""
    report = build_report(models, **kwargs)
    atomic_write_text(path, report.html, "report")
    return report
