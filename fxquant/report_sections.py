"""The sections of the ``fxquant report`` page, rendered from what :mod:`fxquant.report`
measured (:class:`Measured`): nothing here evaluates a model; every function takes numbers
and images and returns escaped HTML (:mod:`fxquant.report_html` holds the pieces)."""

from __future__ import annotations

import datetime
import html
from dataclasses import dataclass, field

import numpy as np
import torch

from fxquant.analysis import LayerErrorReport
from fxquant.report_html import (
    NO_MATPLOTLIB,
    _CSS,
    _as_display,
    _bar_chart,
    _centre,
    _e,
    _fmt,
    _fold,
    _heat,
    _png_uri,
    _quality_card,
    _section,
    _speed_html,
    _table,
)
from fxquant.sensitivity import SweepResult


@dataclass
class ViewedImage:
    """One benchmark image as the report shows it: uint8 HR (Y for Y-channel models),
    bicubic, FP and quantized outputs, and each one's (PSNR, SSIM) against HR."""

    name: str
    hr: np.ndarray
    bicubic: np.ndarray
    fp: np.ndarray
    quant: np.ndarray
    scores: dict[str, tuple[float, float]]


@dataclass
class Measured:
    """Everything the page shows, measured once (:func:`fxquant.report.measure_report`)."""

    data: dict                       # the JSON-serialisable numbers (Report.data)
    crop_note: str                   # which crops the analyses ran on
    errors: LayerErrorReport
    worst: list[str]
    sweep: SweepResult | None = None
    stats: dict = field(default_factory=dict)   # layer -> ActivationStats of the worst inputs
    images: list[ViewedImage] = field(default_factory=list)
    graph_module: object = None      # the compiled model when its graph is drawn


def quality_html(data: dict, scale: int, limit: int | None) -> str:
    cards = [_quality_card(ds, r["images"], r["fp"]["psnr"], r["quant"]["psnr"], r["fp"]["ssim"],
                           r["quant"]["ssim"]) for ds, r in data["quality"].items()]
    return ('<div class="cards">' + "".join(cards) + "</div>"
            '<p class="note">PSNR/SSIM on the Y channel, borders of '
            f'{scale} pixels shaved' + (f"; first {limit} images per set" if limit else "")
            + ".</p>")


def attribution_html(m: Measured, worst_n: int, plots: bool) -> str:
    errors = m.errors
    ranked = errors.ranked("isolated")
    out = (
        "<p><b>Layers that lose most</b> (isolated SQNR): " + _e(", ".join(
            f"{e.layer} ({_fmt(e.sqnr_isolated)} dB)" for e in ranked[:worst_n])) + ".</p>"
        f"<p class=\"note\">Each quantized layer's output is compared with the float layer of the same name on "
        f"{_e(m.crop_note)}. <b>Isolated</b>: the quantized layer is fed the float model's input "
        "(its local error, split into weight-only and activation-only parts). "
        "<b>Propagated</b>: the quantized model runs on its own activations (the error "
        "accumulated up to that layer). Network output: SQNR "
        f"{_fmt(errors.output_sqnr)} dB, PSNR against the FP output "
        f"{_fmt(errors.output_psnr)} dB.</p>")
    if plots:
        out += ('<img class="plot" alt="per-layer SQNR" src="' + _bar_chart(
            [e.layer for e in errors.layers], [e.sqnr_isolated for e in errors.layers],
            set(m.worst), title=f"isolated SQNR per quantized layer (worst {worst_n} in red)",
            ylabel="SQNR (dB)", first_label="isolated",
            second=[e.sqnr_propagated for e in errors.layers], second_label="propagated") + '">')
    if errors.transformed:
        out += ('<p class="note"><b>Warning:</b> a pass changed the weights of '
                f"{_e(', '.join(errors.transformed))} (e.g. fold-channel-norm folds scales into "
                "them): their outputs are rescaled, so their per-layer numbers and those of the "
                "layers they feed do not measure quantization error alone. The sensitivity "
                "sweep is unaffected when the folding is exact.</p>")
    top = ranked[:max(10, worst_n)]
    out += _fold(f"worst {len(top)} layers by isolated SQNR, with their quantizers", _table(
        ["layer", "module", "quantizer", "isolated dB", "weight-only dB", "activation-only dB",
         "propagated dB", "isolated MSE"],
        [[e.layer, e.module_type, e.quantizer, _fmt(e.sqnr_isolated), _fmt(e.sqnr_weight_only),
          _fmt(e.sqnr_activation_only), _fmt(e.sqnr_propagated), f"{e.mse_isolated:.3g}"]
         for e in top], set(range(worst_n))))
    return out + _fold("all layers in graph order", "<pre>" + _e(errors.table()) + "</pre>")


def sweep_html(m: Measured, worst_n: int, plots: bool) -> str:
    sweep, agreement = m.sweep, m.data.get("agreement")
    if sweep is None:
        return '<p class="note">sweep not run (--no-sweep).</p>'
    sranked = sweep.ranked()
    sworst = {s.layer for s in sranked[:worst_n]}
    iso_rank = {e.layer: i + 1 for i, e in enumerate(m.errors.ranked("isolated"))}
    what = ("only this layer quantized, every other quantizer switched off"
            if sweep.strategy == "only" else "every layer quantized except this one")
    out = (
        "<p><b>Most sensitive layers</b> (output SQNR): " + _e(", ".join(
            f"{s.layer} ({_fmt(s.sqnr)} dB)" for s in sranked[:worst_n])) + ".</p>"
        f"<p class=\"note\">Network output with {what}, against the FP output on the same crops. With all "
        f"layers quantized the output SQNR is {_fmt(sweep.baseline_sqnr)} dB.</p>")
    if plots:
        out += '<img class="plot" alt="sensitivity sweep" src="' + _bar_chart(
            [s.layer for s in sweep.layers], [s.sqnr for s in sweep.layers], sworst,
            title=f"output SQNR with one layer quantized (most sensitive {worst_n} in red)",
            ylabel="output SQNR (dB)") + '">'
    ranking = _table(
        ["rank", "layer", "output SQNR dB", "PSNR vs FP dB", "rank by isolated SQNR"],
        [[i + 1, s.layer, _fmt(s.sqnr), _fmt(s.psnr), iso_rank.get(s.layer, "-")]
         for i, s in enumerate(sranked[:max(10, worst_n)])], set(range(worst_n)))
    out += (
        f"<p>Agreement with the isolated per-layer ranking: top-3 overlap "
        f"{agreement['overlap3']}/3, top-5 overlap {agreement['overlap5']}/5; the sweep's most "
        f"sensitive layer is #{agreement['sweep_worst_isolated_rank']} by isolated SQNR and the "
        f"worst isolated layer is #{agreement['isolated_worst_sweep_rank']} in the sweep; "
        f"Spearman rank correlation {agreement['spearman']:.2f}. The two differ where a "
        "layer's local error is damped (or not) on its way to the output: a layer writing "
        "straight into the residual trunk or the upsampler passes its error on undamped, "
        "while a branch gated by attention or mixed with many other channels damps it.</p>")
    return out + _fold(f"ranking of the {min(len(sranked), max(10, worst_n))} most sensitive "
                       "layers", ranking)


def distributions_html(m: Measured, plots: bool) -> str:
    out = ""
    for layer in m.worst:
        s = m.stats[layer]
        no_range = "" if s.clip is not None else (
            " The quantizer in front of this layer has no static range (it is dynamic, "
            "non-uniform or per-channel).")
        out += f"<h3>{_e(layer)}</h3><p>{_e(s.summary() + no_range)}</p>"
        if plots:
            from fxquant.distributions import figure_to_png, plot_activation, png_data_uri

            out += (f'<img class="plot" alt="distribution of {_e(layer)} input" src="'
                    f'{png_data_uri(figure_to_png(plot_activation(s)))}">')
    return ("<p class=\"note\">Inputs of the worst layers in the float model"
            + (", per channel for each image (bar: min..max, box: mean±std) and as a "
               "histogram; dashed lines are the range of the activation quantizer in front "
               "of the layer." if plots else "; the range of the activation quantizer in "
               "front of the layer and the share of values it clips.") + "</p>" + out)


def _error_maps(image: ViewedImage, crop: int) -> tuple[np.ndarray, np.ndarray, float]:
    """|FP − quant| and |HR − quant| (channel mean for colour) and their shared colour top:
    the 99.5th percentile over both centre crops (1 when both are zero)."""
    diff_fq = np.abs(image.fp.astype(np.float64) - image.quant.astype(np.float64))
    diff_hq = np.abs(image.hr.astype(np.float64) - image.quant.astype(np.float64))
    if diff_fq.ndim == 3:
        diff_fq, diff_hq = diff_fq.mean(axis=2), diff_hq.mean(axis=2)
    top = float(np.percentile(np.concatenate([_centre(diff_fq, crop).ravel(),
                                              _centre(diff_hq, crop).ravel()]), 99.5)) or 1.0
    return diff_fq, diff_hq, top


def crops_html(images: list[ViewedImage], crop: int) -> str:
    out = ""
    for image in images:
        diff_fq, diff_hq, top = _error_maps(image, crop)
        s = image.scores
        panels = [("HR", _as_display(image.hr), ""),
                  ("bicubic", _as_display(image.bicubic), f"{s['bicubic'][0]:.2f} dB"),
                  ("FP", _as_display(image.fp), f"{s['fp'][0]:.2f} dB"),
                  ("quantized", _as_display(image.quant), f"{s['quant'][0]:.2f} dB"),
                  ("|FP − quant|", _heat(diff_fq, top), f"0..{top:.0f}/255"),
                  ("|HR − quant|", _heat(diff_hq, top), f"0..{top:.0f}/255")]
        figures = "".join(
            f'<figure><img alt="{_e(image.name)} {_e(t)}" src="{_png_uri(_centre(a, crop))}">'
            f"<figcaption>{_e(t)}<br>{_e(c)}</figcaption></figure>" for t, a, c in panels)
        out += (f"<h3>{_e(image.name)}</h3><p class=\"note\">centre {crop}×{crop} HR crop; "
                "PSNR of the whole image; error maps share one colour scale (black 0, white = "
                f'the 99.5th percentile).</p><div class="crops">{figures}</div>')
    return out


def graph_html(m: Measured) -> str:
    """The compiled graph as SVG, quantized layers coloured by isolated SQNR (folded)."""
    from fxquant.graphviz import legend_html, to_svg

    sqnr = m.errors.sqnr_map("isolated", key="node")
    return ("<details><summary>show the graph (quantized layers coloured by isolated SQNR; "
            "hover a node for details)</summary>" + legend_html(m.graph_module, sqnr)
            + '<div class="graph">' + to_svg(m.graph_module, errors=sqnr, standalone=False,
                                             id_prefix="report") + "</div></details>")


def page_html(m: Measured, recipe, config, *, name: str, scale: int, plots: bool,
              version: str) -> str:
    """The whole page: headline, images, per-layer error, sweep, distributions, graph,
    recipe, and the measuring phases' times."""
    data = m.data
    title = f"fxquant report: {name} ×{scale}, recipe {recipe.name}"
    recipe_html = _fold(f"recipe {recipe.name} (TOML) and the pass pipeline",
                        f"<pre>{html.escape(recipe.to_toml(), quote=False)}</pre>"
                        f"<p>pipeline <code>{_e(data['pipeline'])}</code></p>")
    graph = graph_html(m) if m.graph_module is not None else ""
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    timings = data.get("timings_s", {})
    body = (f"<h1>{_e(title)}</h1>"
            f'<p class="note">{_e(when)} · fxquant {_e(version)} · torch '
            f"{_e(torch.__version__)}</p>"
            + ("" if plots else f'<p class="notice">{_e(NO_MATPLOTLIB)}</p>')
            + _section("Quality and speed", quality_html(data, scale, config.limit)
                       + _speed_html(data.get("speed")), "headline")
            + _section("Images", crops_html(m.images, config.view_crop), "images")
            + _section("Per-layer error", attribution_html(m, config.worst, plots), "layers")
            + _section("Sensitivity sweep", sweep_html(m, config.worst, plots), "sweep")
            + _section("Distributions of the worst layers' inputs",
                       distributions_html(m, plots), "distributions")
            + (_section("Graph", graph, "graph") if graph else "")
            + _section("Recipe", recipe_html, "recipe")
            + '<p class="note">time (s): ' + _e(", ".join(f"{k} {v:.1f}" for k, v in
                                                         timings.items())) + "</p>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")
