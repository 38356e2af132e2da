"""The HTML pieces of the ``fxquant report`` page (fxquant/report.py measures what goes in it,
fxquant/report_sections.py renders each section from those numbers):
escaping, tables, sections and folds, embedded PNG images and charts, the headline's quality
cards and speed line. Every text is escaped; images are ``data:`` URIs (the page is offline)."""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np

# ----------------------------------------------------------------------------- images
def _png_uri(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _heat(values: np.ndarray, top: float) -> np.ndarray:
    """A black-red-yellow-white map of ``values`` in [0, top] as uint8 RGB."""
    v = np.clip(values / max(top, 1e-12), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return (rgb * 255).round().astype(np.uint8)


def _centre(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return img[top:top + size, left:left + size]


def _as_display(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return np.clip(np.round(img), 0, 255).astype(np.uint8)
    return img.astype(np.uint8)


# ----------------------------------------------------------------------------- plots
def _plot_available() -> bool:
    try:
        from fxquant.distributions import require_matplotlib

        require_matplotlib()
        return True
    except ImportError:
        return False


def _bar_chart(names: list[str], values: list[float], highlight: set[str], *, title: str,
               ylabel: str, second: list[float] | None = None, second_label: str = "",
               first_label: str = "") -> str:
    from fxquant.distributions import figure_to_png, png_data_uri, require_matplotlib

    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(max(7.0, 0.2 * len(names) + 2), 3.6))
    finite = [v for v in values + (second or []) if math.isfinite(v)]
    cap = max(finite) + 3 if finite else 1.0
    shown = [v if math.isfinite(v) else cap for v in values]
    colours = ["#d73027" if n in highlight else "#6baed6" for n in names]
    xs = np.arange(len(names))
    ax.bar(xs, shown, color=colours, label=first_label or None)
    if second is not None:
        ax.plot(xs, [v if math.isfinite(v) else cap for v in second], "k.", markersize=5,
                label=second_label)
    ax.axhline(0, color="#555", linewidth=0.6)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    for tick, n in zip(ax.get_xticklabels(), names):
        if n in highlight:
            tick.set_color("#d73027")
            tick.set_fontweight("bold")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if first_label or second is not None:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(-0.7, len(names) - 0.3)
    fig.tight_layout()
    return png_data_uri(figure_to_png(fig))


# ----------------------------------------------------------------------------- HTML pieces
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: list[list[object]], highlight_rows: set[int] = frozenset()
           ) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    worst = ' class="worst"'
    body = "".join(
        f"<tr{worst if i in highlight_rows else ''}>"
        + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.worst td { background: #fde0dd; font-weight: bold; }
pre { background: #f6f6f6; padding: 0.8em; overflow: auto; font-size: 12px; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.crops { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 1em; }
.crops figure { margin: 0; text-align: center; font-size: 12px; }
.crops img { width: 160px; height: 160px; image-rendering: pixelated; border: 1px solid #ccc; }
.note { color: #666; font-size: 13px; }
.graph { overflow: auto; max-height: 80vh; border: 1px solid #ccc; }
.notice { background: #fff3cd; border: 1px solid #e0c36c; padding: 0.5em 0.8em; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 0.6em 0; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.6em 1em; min-width: 220px; }
.card .what { font-size: 13px; color: #555; }
.card .delta { font-size: 2em; font-weight: bold; }
.card .psnr { font-size: 1.1em; }
.card .ssim { font-size: 13px; color: #444; }
.speed { font-size: 1.2em; }
details { margin: 0.6em 0; } summary { cursor: pointer; color: #245; }
"""


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>\n'


# ----------------------------------------------------------------------------- main


NO_MATPLOTLIB = ("matplotlib is not installed: charts are omitted; pip install matplotlib "
                 "(the viz extra)")


def _fold(summary: str, body: str) -> str:
    """``body`` folded away under a one-line ``summary`` (escaped)."""
    return f"<details><summary>{_e(summary)}</summary>\n{body}\n</details>"


def _quality_card(dataset: str, images: int, fp_psnr: float, q_psnr: float, fp_ssim: float,
                  q_ssim: float) -> str:
    delta = q_psnr - fp_psnr
    return (f'<div class="card"><div class="what">{_e(dataset)} ({images} image'
            f'{"s" if images != 1 else ""})</div>'
            f'<div class="delta">ΔPSNR {_e(f"{delta:+.2f}")} dB</div>'
            f'<div class="psnr">FP {fp_psnr:.2f} dB → quantized {q_psnr:.2f} dB</div>'
            f'<div class="ssim">SSIM {fp_ssim:.4f} → {q_ssim:.4f} '
            f"({q_ssim - fp_ssim:+.4f})</div></div>")


def _speed_html(speed: dict | None) -> str:
    """The headline's speed line: a measured ratio, or one line saying why there is none."""
    bench = ("<code>fxquant bench</code> compares it with the Inductor-compiled lowered model, "
             "torch.ao and PT2E int8 at 256², with peak memory")
    if speed is None:
        return f'<p class="note">Speed not measured (--no-speed); {bench}.</p>'
    if speed["status"] != "measured":
        return f'<p class="note">Speed not measured: {_e(speed["reason"])}.</p>'
    return (f'<p class="speed">Speed: the lowered integer model runs <b>{speed["ratio"]:.2f}×'
            f'</b> as fast as FP32 eager ({speed["ratio_min"]:.2f}–{speed["ratio_max"]:.2f} '
            f'across rounds): {speed["lowered_ms"]:.1f} ms vs {speed["fp32_ms"]:.1f} ms per '
            f'1×{speed["channels"]}×{speed["size"]}×{speed["size"]} LR input on the CPU</p>'
            f'<p class="note">{_e(speed["how"])}; {speed["rounds"]} interleaved rounds after '
            f'warm-up, {speed["threads"]} torch thread{"s" if speed["threads"] != 1 else ""}; '
            f"median time and the median (min–max) of the per-round ratio. A small input and "
            f"few rounds: an indication, not a benchmark; {bench}.</p>")
