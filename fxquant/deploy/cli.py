"""``fxquant export``: write a compiled model as ONNX (for ONNX Runtime's integer kernels) or as
a ``torch.export`` program, then load the written file back and check it against the model."""

from __future__ import annotations

import argparse
import json

import torch

from fxquant.cli_args import positive_int
from fxquant.errors import FxquantError
from fxquant.files import check_format_suffix


DEFAULT_RECIPE = "mse-w8a8-sym"  # not the flag's default: with --compiled a --recipe is an error
SUFFIXES = {"onnx": ".onnx", "torch-export": ".pt2", "torchscript": ".ts"}


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compiled", help="a saved compiled model (instead of --model/--scale/--recipe)")
    p.add_argument("--model", help="zoo model name (see `fxquant models`)")
    p.add_argument("--scale", type=positive_int, help="upscaling factor")
    p.add_argument("--recipe",
                   help="preset or .toml recipe (default mse-w8a8-sym; ONNX takes the static "
                        "uniform presets, and I²NQ's in the integer form)")
    p.add_argument("--checkpoint", help="float weights instead of the pretrained ones")
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.add_argument("--format", choices=("onnx", "torch-export", "torchscript"), default="onnx")
    p.add_argument("--out", required=True, help="output file (.onnx, .pt2 or .ts)")
    p.add_argument("--form", choices=("integer", "qdq", "fake-quant"),
                   help="onnx (default integer): 'integer' (QLinearConv where a conv feeds a "
                        "quantizer, ConvInteger elsewhere: every quantized conv integer in ONNX "
                        "Runtime), 'qdq' (Q/DQ around float Conv everywhere; symmetric 8-bit "
                        "weights only) or "
                        "'fake-quant' (the fake-quant graph as float ops: DAQ, DFSQ)")
    p.add_argument("--opset", type=int, default=13, help="onnx opset (default 13)")
    p.add_argument("--target", choices=("fake-quant", "reference", "cpu"),
                   help="torch-export, torchscript (default fake-quant): the fake-quant model or "
                        "its integer lowering")
    p.add_argument("--size", type=positive_int, default=32,
                   help="side of the random LR check input")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _compiled(args: argparse.Namespace):
    from fxquant.workflow import load_compiled, prepare, refuse_with_compiled

    if args.compiled:  # --model and --scale, if given, must be the file's
        refuse_with_compiled(recipe=args.recipe, checkpoint=args.checkpoint)
        return load_compiled(args.compiled, model=args.model, scale=args.scale,
                             data_root=args.data).quant_model
    if not (args.model and args.scale):
        raise FxquantError("export needs --compiled FILE, or --model and --scale (with --recipe)")
    return prepare(args.model, args.scale, args.recipe or DEFAULT_RECIPE, data_root=args.data,
                   checkpoint=args.checkpoint).quant_model


def check_format_flags(args: argparse.Namespace) -> None:
    """Flags that the chosen --format would ignore, and an --out named for another format."""
    if args.format == "onnx" and args.target:
        raise FxquantError("--target applies to --format torch-export and torchscript; an ONNX "
                           "export chooses its integer form with --form")
    if args.format != "onnx" and args.form:
        raise FxquantError(f"--form applies to --format onnx; {args.format} takes --target "
                           "(fake-quant, reference or cpu)")
    check_format_suffix(args.out, args.format, SUFFIXES)


def run(args: argparse.Namespace) -> int:
    from fxquant.deploy import export
    from fxquant.files import check_output_path

    check_format_flags(args)
    check_output_path(args.out, "export output (--out)")
    form, target = args.form or "integer", args.target or "fake-quant"
    gm = _compiled(args)
    channels = next(m.in_channels for m in gm.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(1, channels, args.size, args.size, generator=torch.Generator().manual_seed(0))
    summary = {"out": args.out, "format": args.format, "recipe": gm.fxquant_recipe.name}
    if args.format == "onnx":
        from fxquant.deploy.ort import OrtRunner, node_counts, session

        model = export(gm, args.out, format="onnx", form=form, opset=args.opset)
        y = OrtRunner(session(args.out))(x)
        summary.update(form=form, opset=model.opset_import[0].version, nodes=dict(node_counts(model)),
                       runtime="onnxruntime")
    else:
        from fxquant.deploy.torch_export import exportable_module, load_program

        export(gm, args.out, format=args.format, target=target)
        with torch.no_grad():
            y = (load_program(args.out) if args.format == "torch-export"
                 else torch.jit.load(args.out))(x)
        summary.update(target=target, runtime="torch.export.load" if args.format ==
                       "torch-export" else "torch.jit.load")
        gm = exportable_module(gm, target)
    with torch.no_grad():
        expected = gm(x)
    summary["max_abs_diff"] = float((y - expected).detach().abs().max())
    summary["check_input"] = list(x.shape)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out} ({args.format}, recipe {summary['recipe']})")
        if "nodes" in summary:
            print("nodes: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["nodes"].items())))
        print(f"reloaded with {summary['runtime']}: max |Δ| vs the compiled model "
              f"{summary['max_abs_diff']:.3g} on a random {tuple(x.shape)} input")
    return 0
