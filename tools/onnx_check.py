"""Exported ONNX models against their fake-quant models: for each zoo model × static uniform
preset, export to ONNX (checked with onnx.checker full_check), run it in ONNX Runtime
(CPUExecutionProvider, ORT_ENABLE_ALL), score Set5 beside fxquant's fake-quant model, and
count the conv node types in the graph ONNX Runtime runs (its saved optimized model).

    python tools/onnx_check.py [--models imdn,pan,carn_m,fsrcnn] [--scale 4]
        [--recipes minmax-w8a8,mse-w8a8,mse-w8a8-sym,percentile-w8a8] [--form integer]
        [--json out.json] [--write docs/deploy.md]

Exit status 1 when a row misses the acceptance: |Δ PSNR| > 0.02 dB or, in the integer form,
no integer conv or a float conv left for a quantized layer (more float convs than the model's
unquantized ones).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from torch import nn

from fxquant.deploy.onnx import to_onnx
from fxquant.deploy.ort import FLOAT_CONVS, OrtRunner, optimized_counts, session
from fxquant.files import atomic_write_text
from fxquant.markdown import write_section
from fxquant.quant import QuantConv2d
from fxquant.workflow import as_sr_function, evaluate_sets, prepare

PRESETS = ("minmax-w8a8", "mse-w8a8", "mse-w8a8-sym", "percentile-w8a8")
MODELS = ("imdn", "pan", "carn_m", "fsrcnn")
SECTION = "## ONNX Runtime vs fake-quant"
TOLERANCE_DB = 0.02


def check(model: str, scale: int, recipe: str, form: str, data: str | None) -> dict:
    zoo = prepare(model, scale, recipe, data_root=data)
    fake = zoo.quant_model
    onnx_model = to_onnx(fake, form=form)  # raises unless onnx.checker(full_check=True) passes
    blob = onnx_model.SerializeToString()
    counts = optimized_counts(blob)
    runner = OrtRunner(session(blob))
    # per call: a conv module the model calls k times (CARN-M's shared blocks) counts k times,
    # as ONNX (and the lowering) has k convs for it
    calls = [fake.get_submodule(n.target) for n in fake.graph.nodes if n.op == "call_module"]
    convs = [m for m in calls if isinstance(m, nn.Conv2d)]
    quantized = sum(isinstance(m, QuantConv2d) for m in convs)
    row = {"model": model, "scale": scale, "recipe": recipe, "form": form,
           "quantized_convs": quantized, "float_layers": len(convs) - quantized,
           "qlinearconv": counts["QLinearConv"], "convinteger": counts["ConvInteger"],
           "float_conv": sum(counts[t] for t in FLOAT_CONVS), "checker": "pass"}
    for name, run in (("fake", as_sr_function(fake, zoo.spec, scale)), ("ort", runner)):
        row[f"{name}_psnr"] = round(evaluate_sets(run, zoo.spec, scale, ["Set5"],
                                                  data_root=data)["Set5"].psnr, 4)
    row["delta"] = round(row["ort_psnr"] - row["fake_psnr"], 4)
    # the qdq form leaves convs with float outputs as float Conv in ONNX Runtime (by design):
    # only the integer form must run every quantized conv as an integer kernel
    integer_ok = row["qlinearconv"] + row["convinteger"] > 0 and row["float_conv"] <= row["float_layers"]
    row["ok"] = abs(row["delta"]) <= TOLERANCE_DB and (form != "integer" or integer_ok)
    return row


def render(rows: list[dict], command: str, section: str = SECTION) -> str:
    lines = [section, "", f"`{command}`", "",
             "Set5 PSNR (dB) of fxquant's fake-quant model and of its ONNX export run by ONNX "
             "Runtime (CPUExecutionProvider, ORT_ENABLE_ALL); every exported model passed "
             "`onnx.checker.check_model(full_check=True)`. Conv node types are counted in the "
             "graph ONNX Runtime runs (`SessionOptions.optimized_model_filepath`): QLinearConv and "
             "ConvInteger are integer kernels (an asymmetric-weight conv has a second, one-plane "
             "ConvInteger for its centring sums); float Conv should equal the model's unquantized "
             "convs (the recipe keeps the first and last conv in float). Conv counts are per call "
             "(CARN-M calls its shared blocks several times). ok: |Δ| ≤ 0.02 dB and, for the integer "
             "form, an integer kernel for every quantized conv (no float Conv beyond the "
             "unquantized ones).", "",
             "| model | recipe | ONNX form | fake-quant PSNR | ORT PSNR | Δ ORT − fake | QLinearConv "
             "| ConvInteger | float Conv | quantized / unquantized convs | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ×{r['scale']} | {r['recipe']} | {r['form']} | "
                     f"{r['fake_psnr']:.4f} | {r['ort_psnr']:.4f} | {r['delta']:+.4f} | "
                     f"{r['qlinearconv']} | {r['convinteger']} | {r['float_conv']} | "
                     f"{r['quantized_convs']} / {r['float_layers']} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--recipes", default=",".join(PRESETS))
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--form", default="integer", choices=("integer", "qdq", "fake-quant"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--write", default=None, help="Markdown file whose section to replace")
    parser.add_argument("--section", default=SECTION)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for recipe in args.recipes.split(","):
            row = check(model, args.scale, recipe, args.form, args.data)
            print(json.dumps(row), flush=True)
            rows.append(row)
    command = "python tools/onnx_check.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = render(rows, command.strip(), args.section)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n", "check rows")
    if args.write:
        write_section(args.write, args.section, text, preamble="# Deployment\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
