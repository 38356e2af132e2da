"""The HTML report: contents, self-containment, and loading in headless Chromium."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torch import nn

import fxquant
from fxquant.models import ModelSpec
from fxquant import report as report_module
from fxquant.report import ReportConfig, build_report, measure_speed, write_report
from fxquant import report_html
from fxquant.report_html import NO_MATPLOTLIB
from fxquant.sensitivity import rank_agreement, spearman
from fxquant.workflow import ZooModels

pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
INSTALL_TIMEOUT_S = 600
BROWSER_TIMEOUT_S = 60


class SmallSR(nn.Module):
    """Like conftest's TinySR (``conftest`` is not importable by name: tests/data has one)."""

    def __init__(self, channels: int = 8, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.scale = scale

    def forward(self, x):
        h = self.head(x)
        return nn.functional.pixel_shuffle(self.tail(h + self.body(h)), self.scale)


@pytest.fixture(scope="module")
def tiny_report(data, tmp_path_factory):
    """A report on the tiny SR network (×2, untrained) over the first Set5 image."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SmallSR().eval()
    calib = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = fxquant.compile(model, "minmax-w4a4", calib=calib)
    models = ZooModels(ModelSpec("tiny", (2,), "rgb", False), 2, gm.fxquant_recipe, model, gm)
    config = ReportConfig(datasets=["Set5"], limit=1, analysis_images=1, crop=24, worst=2,
                          view_images=1, view_crop=64)
    path = tmp_path_factory.mktemp("report") / "tiny.html"
    report = write_report(path, models, config=config, data_root=data)
    torch.set_num_threads(threads)
    return path, report


def test_report_contents(tiny_report):
    path, report = tiny_report
    page = path.read_text(encoding="utf-8")
    for section in ("headline", "images", "layers", "sweep", "distributions", "graph", "recipe"):
        assert f'<section id="{section}">' in page
    assert 'name = "minmax-w4a4"' in page  # the recipe as TOML
    assert report.data["quality"]["Set5"]["images"] == 1
    worst = report.errors.worst(2, "isolated")
    assert report.data["worst"] == worst
    for layer in worst:
        assert f"<h3>{layer}</h3>" in page  # its distribution plot
    assert len(report.sweep.layers) == 3 and "agreement" in report.data
    # images: 2 bar charts, 2 distribution figures, 6 crops
    assert page.count("<img ") == 2 + 2 + 6
    assert page.count('src="data:image/png;base64,') == 10
    summary = report.summary()
    assert "tiny x2, recipe minmax-w4a4" in summary and "worst layers" in summary
    assert NO_MATPLOTLIB not in page  # matplotlib is installed here


def _inside_details(page: str, needle: str) -> bool:
    """Whether every occurrence of ``needle`` lies in a <details> element (none nest here)."""
    at = [i for i in range(len(page)) if page.startswith(needle, i)]
    assert at, needle
    return all(page.rfind("<details", 0, i) > page.rfind("</details>", 0, i) for i in at)


def test_report_leads_with_the_headline(tiny_report):
    """Headline (quality and speed), then crops, then the per-layer chart; the recipe last."""
    path, report = tiny_report
    page = path.read_text(encoding="utf-8")
    first_section = page.index("<section")
    assert first_section == page.index('<section id="headline">')
    order = [page.index('<section id="headline">'), page.index("ΔPSNR"),
             page.index('<section id="images">'), page.index('alt="per-layer SQNR"'),
             page.index('<section id="recipe">')]
    assert order == sorted(order), order
    q = report.data["quality"]["Set5"]
    assert f"ΔPSNR {q['quant']['psnr'] - q['fp']['psnr']:+.2f} dB" in page
    assert f"FP {q['fp']['psnr']:.2f} dB → quantized {q['quant']['psnr']:.2f} dB" in page
    # minmax-w4a4 lowers: the headline has a measured speed, placed before the crops
    speed = report.data["speed"]
    assert speed["status"] == "measured" and speed["ratio"] > 0, speed
    assert speed["how"] == "lower{target=cpu}, eager (no Inductor)"
    assert first_section < page.index('class="speed"') < page.index('<section id="images">')
    assert f"<b>{speed['ratio']:.2f}×</b>" in page and "speed:" in report.summary()


def test_report_folds_recipe_and_layer_descriptions(tiny_report):
    path, report = tiny_report
    page = path.read_text(encoding="utf-8")
    assert _inside_details(page, 'name = "minmax-w4a4"')  # the recipe TOML
    assert _inside_details(page, report.data["pipeline"])  # the pass pipeline
    quantizers = {e.quantizer for e in report.errors.layers if e.quantizer}
    assert quantizers
    for text in quantizers:  # the long per-layer quantizer descriptions
        assert _inside_details(page, report_html._e(text)), text
    assert not _inside_details(page, 'alt="per-layer SQNR"')  # the chart stays visible
    assert not _inside_details(page, "ΔPSNR")


def test_report_is_self_contained(tiny_report):
    page = tiny_report[0].read_text(encoding="utf-8")
    for bad in ("http://", "https://", 'src="//', "<link", "<script", "@import"):
        assert bad not in page, bad
    assert re.findall(r"url\((?!#)", page) == []  # only in-page references (SVG markers)
    for attr, value in re.findall(r'\b(src|href)="([^"]*)"', page):
        assert value.startswith("data:") or value.startswith("#"), (attr, value[:40])


def test_report_without_matplotlib(tiny_report, monkeypatch, data):
    """One notice at the top instead of one per section; the statistics are still there."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(report_module, "_plot_available", lambda: False)
    models = _tiny_models()
    report = build_report(models, config=ReportConfig(limit=1, analysis_images=1, crop=16,
                                                      view_images=1, view_crop=32,
                                                      sweep=False, graph=False, speed=False),
                          data_root=data)
    page = report.html
    assert page.count("matplotlib is not installed") == page.count("charts are omitted") == 1
    assert page.count(NO_MATPLOTLIB) == 1
    assert page.index(NO_MATPLOTLIB) < page.index("<section")
    assert "plots need matplotlib" not in page
    assert page.count("<img ") == 6  # the image crops need only Pillow
    for layer in report.data["worst"]:  # distribution statistics need no matplotlib
        assert f"<h3>{layer}</h3>" in page
    assert report.sweep is None and "sweep not run" in page
    assert "speed" not in report.data and "Speed not measured (--no-speed)" in page


def test_speed_is_measured_only_for_lowering_recipes(data):
    """A recipe without an integer form gets a reason and no number; an already lowered model
    is timed as it is."""
    torch.manual_seed(0)
    model = SmallSR().eval()
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    spec = ModelSpec("tiny", (2,), "rgb", False)
    floats = fxquant.compile(model, "i2nq-w4a4-float", calib=calib)  # free float levels
    speed = measure_speed(ZooModels(spec, 2, floats.fxquant_recipe, model, floats), size=16,
                          rounds=2)
    assert speed["status"] == "not lowerable" and "integer_grid" in speed["reason"]
    assert set(speed) == {"status", "reason"}  # no timing made up
    line = report_html._speed_html(speed)
    assert "Speed not measured" in line and "×" not in line
    lowered = fxquant.lowered_copy(fxquant.compile(model, "minmax-w8a8", calib=calib), "cpu")
    speed = measure_speed(ZooModels(spec, 2, lowered.fxquant_recipe, model, lowered), size=16,
                          rounds=2)
    assert speed["status"] == "measured" and speed["how"].endswith("(already lowered)")
    assert speed["size"] == 16 and speed["rounds"] == 2 and speed["lowered_ms"] > 0


def _tiny_models() -> ZooModels:
    torch.manual_seed(0)
    model = SmallSR().eval()
    calib = torch.rand(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    gm = fxquant.compile(model, "minmax-w8a8", calib=calib)
    return ZooModels(ModelSpec("tiny", (2,), "rgb", False), 2, gm.fxquant_recipe, model, gm)


def test_spearman_and_agreement_helpers(tiny_report):
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1.0, float("inf"), 2.0], [1.0, 3.0, 2.0]) == pytest.approx(1.0)
    _, report = tiny_report
    agreement = rank_agreement(report.errors, report.sweep)
    assert set(agreement) == {"overlap3", "overlap5", "sweep_worst_isolated_rank",
                              "isolated_worst_sweep_rank", "spearman"}
    assert 1 <= agreement["sweep_worst_isolated_rank"] <= 3


# ----------------------------------------------------------------------------- browser
def _install_chromium() -> str | None:
    """apt-get install chromium (once, under a lock shared by xdist workers); the reason when
    it cannot be done."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "chromium is not installed and the tests do not run as root to install it"
    if shutil.which("apt-get") is None:
        return "chromium is not installed and apt-get is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open("/tmp/fxquant-chromium-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(CHROMIUM):
            return None
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        try:
            done = subprocess.run(install, env=env, capture_output=True, text=True,
                                  timeout=INSTALL_TIMEOUT_S)
            if done.returncode != 0:  # stale package lists: refresh once and retry
                subprocess.run(["apt-get", "update"], env=env, capture_output=True,
                               timeout=INSTALL_TIMEOUT_S)
                done = subprocess.run(install, env=env, capture_output=True, text=True,
                                      timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"installing chromium took more than {INSTALL_TIMEOUT_S} s"
        if done.returncode != 0 or not os.path.exists(CHROMIUM):
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            return f"apt-get install chromium failed (registry unreachable?): {tail[0]}"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        reason = _install_chromium()
        if reason:
            pytest.skip(reason)
    return CHROMIUM


_ERROR_TRAP = """<script>window.__fxqErrors = [];
window.addEventListener('error', function (e) {
  var what = e.target && (e.target.alt || e.target.tagName);
  window.__fxqErrors.push(e.message || ('failed to load ' + what));
}, true);
var __fxqConsoleError = console.error;
console.error = function () { window.__fxqErrors.push(Array.from(arguments).join(' '));
  __fxqConsoleError.apply(console, arguments); };
</script>"""

_CHECK = """<script>window.addEventListener('load', function () {
  var imgs = Array.from(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var div = document.createElement('div');
  div.id = 'fxq-browser-check';
  div.textContent = 'images=' + imgs.length + ' broken=' + broken.length + ' errors=' +
    window.__fxqErrors.length + ' [' + broken.map(function (i) { return i.alt; })
    .concat(window.__fxqErrors).join(' | ') + ']';
  document.body.appendChild(div);
});</script>"""

_RESULT = re.compile(r'<div id="fxq-browser-check">images=(\d+) broken=(\d+) errors=(\d+) '
                     r"\[(.*?)\]</div>", re.S)


def load_in_browser(chromium: str, page: Path, workdir: Path) -> dict:
    """Open a copy of ``page`` (with an error trap in <head> and an image check on load) in
    headless Chromium; return the counts and the console lines Chromium logged."""
    html = page.read_text(encoding="utf-8")
    html = html.replace("<head>", "<head>" + _ERROR_TRAP, 1)
    html = html.replace("</body>", _CHECK + "</body>", 1)
    copy = workdir / f"checked-{page.name}"
    copy.write_text(html, encoding="utf-8")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={workdir / 'chromium-profile'}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
               "--dump-dom", copy.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    match = _RESULT.search(done.stdout)
    assert match, f"no check result in the dumped DOM; chromium said:\n{done.stderr[-2000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return {"images": int(match.group(1)), "broken": int(match.group(2)),
            "errors": int(match.group(3)), "detail": match.group(4), "console": console,
            "uncaught": [line for line in console if "Uncaught" in line or "Error" in line]}


def test_browser_check_catches_broken_images_and_errors(chromium, tmp_path):
    """The harness itself: a broken image and a script error are both reported."""
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head></head><body>"
                    '<img alt="broken" src="data:image/png;base64,AAAA">'
                    "<script>console.error('boom'); notDefined();</script></body></html>")
    result = load_in_browser(chromium, page, tmp_path)
    assert result["images"] == 1 and result["broken"] == 1
    assert result["errors"] >= 2 and "boom" in result["detail"]
    assert any("notDefined" in line for line in result["uncaught"])


def test_report_renders_in_headless_chromium(chromium, tiny_report, tmp_path):
    path, _ = tiny_report
    result = load_in_browser(chromium, path, tmp_path)
    assert result["images"] == 10
    assert result["broken"] == 0, result["detail"]
    assert result["errors"] == 0, result["detail"]
    assert result["uncaught"] == [], result["console"]


def test_graph_view_renders_in_headless_chromium(chromium, tmp_path, tiny_sr, calib):
    from fxquant.graphviz import to_html

    gm = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib)
    page = tmp_path / "graph.html"
    page.write_text(to_html(gm), encoding="utf-8")
    result = load_in_browser(chromium, page, tmp_path)
    assert result["errors"] == 0 and result["uncaught"] == [], result
    assert result["images"] == 0


@pytest.mark.slow
def test_cli_report_on_a_compiled_imdn(data, tmp_path, capsys):
    """``fxquant report --compiled m.fxq``: the float model comes from the zoo name in the file."""
    from fxquant.cli import main
    from fxquant.models import build_model

    model = build_model("imdn", 4, pretrained=True, data_root=data)
    calib = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "imdn.fxq"
    fxquant.save(fxquant.compile(model, "minmax-w4a4", calib=calib), path, model_name="imdn",
                 scale=4)
    out = tmp_path / "imdn.html"
    assert main(["report", "--compiled", str(path), "--data", str(data), "--datasets", "Set5",
                 "--limit", "1", "--images", "1", "--crop", "24", "--no-sweep", "--no-graph",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "imdn x4, recipe minmax-w4a4" in printed and "worst layers (isolated SQNR)" in printed
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == 1 + 3 + 2 * 6  # chart, plots, crops
    assert main(["report", "--data", str(data), "--out", str(out)]) == 2  # nothing to report on
