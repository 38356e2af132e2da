"""DAQ (or DFSQ) lowered against its fake-quant: Set5 PSNR of the fake-quant, ``reference``
and ``cpu`` versions of each zoo model × preset, per-layer agreement, and the largest
integer code.

    python tools/daq_lower_check.py [--models imdn,pan,carn_m] [--scale 4]
        [--recipes daq-w4a4,daq-mp4] [--json out.json] [--write docs/lowering.md]
    python tools/daq_lower_check.py --recipes dfsq-w4a4 ...    # the DFSQ section

Both DAQ and DFSQ lower to per-(image, channel) integer codes read by the same per-image
folded conv (fxquant/lower/daq.py, fxquant/lower/subset.py). DAQ presets and DFSQ presets
write separate sections; one call takes one kind.

Both lowered targets are built from the same fake-quant model (``fxquant.lowered_copy``), so
any difference is the lowered execution alone; ``cpu`` is scored with its default two int8
planes of the per-image folded weights and with one (``lower{planes=1}``);
for DAQ, one plane also with the codes unbalanced (``DaqQuantize.code_limit = 0``); for
DFSQ, ``reference`` and one-plane ``cpu`` also with the codes re-gridded to one byte
(``lower{subset_codes=u8}``). Per
layer, each lowered codes+conv pair is run on the raw input its fake-quant quantizer saw
(first two Set5 images) and compared with the fake-quant conv's output, relative to that
output's largest magnitude. The largest code is
over those probes and the whole Set5 run of the ``reference`` model (the unclipped post-ReLU
branch has no upper bound: this is its measured range).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import fxquant
from fxquant.data import BenchmarkSet, to_tensor, to_y_tensor
from fxquant.errors import FxquantError
from fxquant.files import atomic_write_text, check_output_path
from fxquant.lower.compare import daq_layer_agreement
from fxquant.lower.daq import DaqQuantize
from fxquant.lower.subset import SubsetQuantize
from fxquant.markdown import tool_command, write_section
from fxquant.workflow import as_sr_function, evaluate_sets, prepare

MODELS = ("imdn", "pan", "carn_m")
RECIPES = ("daq-w4a4", "daq-mp4")
SECTION = "## DAQ lowered vs fake-quant"
SECTIONS = {"daq": SECTION, "dfsq": "## DFSQ lowered vs fake-quant"}


def check(model: str, scale: int, recipe: str, data: str | None) -> dict:
    zoo = prepare(model, scale, recipe, data_root=data)
    fake = zoo.quant_model
    lowered = {t: fxquant.lowered_copy(fake, t) for t in ("reference", "cpu")}
    lowered["cpu1"] = one_plane(fake, balanced=True)
    if any(isinstance(m, DaqQuantize) for m in lowered["cpu"].modules()):
        lowered["cpu1u"] = one_plane(fake, balanced=False)  # what balancing the codes gains
    else:  # DFSQ codes on one byte (lower{subset_codes=u8}): the grid's own cost, the fast setting
        lowered["refu8"] = fxquant.lowered_copy(fake, "reference", subset_codes="u8")
        lowered["cpu1u8"] = fxquant.lowered_copy(fake, "cpu", planes=1, subset_codes="u8")
    to_input = to_y_tensor if zoo.spec.color == "y" else to_tensor
    probes = [to_input(p.lr) for p in BenchmarkSet("Set5", scale, root=data, limit=2)]
    row = {"model": model, "scale": scale, "recipe": recipe}
    for target, gm in lowered.items():
        agreement = daq_layer_agreement(fake, gm, probes)
        row["layers"] = len(agreement)
        row[f"{target}_max_rel"] = max(a[1] for a in agreement)
        if not target.endswith("u8"):  # the exact codes' range
            row["max_code"] = max(row.get("max_code", 0), max(a[2] for a in agreement))
    for name, gm in {"fake": fake, **lowered}.items():
        score = evaluate_sets(as_sr_function(gm, zoo.spec, scale), zoo.spec, scale, ["Set5"],
                              data_root=data)["Set5"]
        row[f"{name}_psnr"] = round(score.psnr, 4)
    codes = [m for m in lowered["reference"].modules() if isinstance(m, DaqQuantize)]
    relu = [m.max_code for m in codes if m.branch == "relu"]
    # DFSQ: every subset quantizer's code range (the points' integers on 2^-e, less the base)
    relu += [m.max_code for m in lowered["reference"].modules() if isinstance(m, SubsetQuantize)]
    row["relu_layers"] = len(relu)
    row["relu_max_code"] = max(relu, default=0)
    row["relu_over_255"] = sum(c > 255 for c in relu)
    return row


def one_plane(fake, balanced: bool):
    """The cpu target with one int8 plane of the folded weights; DAQ codes balanced (the
    default, ``m·q`` with step ``Δ/m``) or handed as they are (``code_limit = 0``)."""
    gm = fxquant.lowered_copy(fake, "cpu", planes=1)
    for m in gm.modules():
        if isinstance(m, DaqQuantize) and not balanced:
            m.code_limit = 0
    return gm


def render(rows: list[dict], command: str, section: str = SECTION) -> str:
    dfsq = section == SECTIONS["dfsq"]
    codes = ("Largest code: the largest point code (I − b_c)/g_c of any subset quantizer "
             "(layers whose codes exceed 255, i.e. two uint8 planes on cpu / subset layers)."
             if dfsq else "Largest relu code: the largest unclipped post-ReLU code "
             "q = round(x/Δ) over the whole Set5 run (layers above 255 / post-ReLU layers).")
    lines = [section, "", f"`{command}`", "",
             "Set5 PSNR of each version. Layer diff: the largest |lowered − fake-quant| of a "
             "conv output on the same raw input, relative to the largest |fake-quant output| "
             f"of that layer (first two Set5 images). {codes}", "",
             f"| model | recipe | {'DFSQ' if dfsq else 'DAQ'} convs | fake-quant | reference "
             "| cpu | cpu, 1 weight plane | Δ ref − fake | Δ cpu − fake | Δ cpu 1-plane − fake "
             "| max layer diff ref / cpu / cpu 1-plane | "
             f"largest {'' if dfsq else 'relu '}code (layers > 255) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    unbalanced = all("cpu1u_psnr" in r for r in rows)
    if unbalanced:  # DAQ: the one-plane cpu model without balanced codes, for comparison
        lines[-2] += " cpu 1-plane, codes unbalanced: Δ − fake / max layer diff |"
        lines[-1] += "---|"
    one_byte = all("cpu1u8_psnr" in r for r in rows)
    if one_byte:  # DFSQ: codes re-gridded to one byte (lower{subset_codes=u8})
        lines[-2] += (" u8 codes: Δ ref − fake / Δ cpu 1-plane − fake / max layer diff ref / "
                      "cpu 1-plane |")
        lines[-1] += "---|"
    for r in rows:
        lines.append(
            f"| {r['model']} ×{r['scale']} | {r['recipe']} | {r['layers']} | "
            f"{r['fake_psnr']:.4f} | {r['reference_psnr']:.4f} | {r['cpu_psnr']:.4f} | "
            f"{r['cpu1_psnr']:.4f} | "
            f"{r['reference_psnr'] - r['fake_psnr']:+.4f} | {r['cpu_psnr'] - r['fake_psnr']:+.4f} | "
            f"{r['cpu1_psnr'] - r['fake_psnr']:+.4f} | "
            f"{r['reference_max_rel']:.1e} / {r['cpu_max_rel']:.1e} / {r['cpu1_max_rel']:.1e} | "
            f"{r['relu_max_code']} ({r['relu_over_255']}/{r['relu_layers']}) |"
            + (f" {r['cpu1u_psnr'] - r['fake_psnr']:+.4f} / {r['cpu1u_max_rel']:.1e} |"
               if unbalanced else "")
            + (f" {r['refu8_psnr'] - r['fake_psnr']:+.4f} / "
               f"{r['cpu1u8_psnr'] - r['fake_psnr']:+.4f} / "
               f"{r['refu8_max_rel']:.1e} / {r['cpu1u8_max_rel']:.1e} |" if one_byte else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--write", help="replace the section of this Markdown file")
    args = parser.parse_args(argv)
    try:
        kinds = {r.split("-")[0] for r in args.recipes.split(",")}
        if len(kinds) != 1 or not kinds <= set(SECTIONS):
            raise FxquantError(f"--recipes {args.recipes}: give DAQ presets (daq-*) or DFSQ "
                               "presets (dfsq-*), one kind per call")
        section = SECTIONS[kinds.pop()]
        for path, what in ((args.json, "rows JSON (--json)"), (args.write, "Markdown (--write)")):
            if path:
                check_output_path(path, what)
    except FxquantError as exc:
        print(f"daq_lower_check: error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            rows.append(check(model, args.scale, recipe, args.data))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = render(rows, tool_command("daq_lower_check.py", argv), section)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1), "rows JSON (--json)")
    if args.write:
        write_section(args.write, section, text)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
