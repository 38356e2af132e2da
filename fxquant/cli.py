"""The ``fxquant`` command line: one subcommand per job (the list below, from the
subcommands themselves)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from fxquant.cli_args import (
    MODEL_HELP,
    add_model_args,
    dataset_list,
    add_model_source_args,
    add_own_model_args,
    non_negative_int,
    positive_int,
)
from fxquant.errors import FxquantError

FLOAT_ONLY = "fp"  # --recipe fp: evaluate the float model alone
EVAL_RECIPE = "minmax-w8a8"  # eval's --recipe when neither it nor --compiled is given


def cmd_eval(args: argparse.Namespace) -> int:
    from fxquant.models.user import own_model_flags, source_from_args
    from fxquant.workflow import evaluate_sets, load_compiled, prepare, refuse_with_compiled

    if args.compiled:
        refuse_with_compiled(recipe=args.recipe, checkpoint=args.checkpoint)
    elif not args.model:
        raise FxquantError("give --model (a zoo model or file.py:Class), or --compiled FILE")
    # before the work, a misspelt model first: a bad name fails now
    source = None if args.compiled else source_from_args(args)
    datasets = dataset_list(args.datasets, args.data)
    if args.compiled:
        models = load_compiled(args.compiled, model=args.model, scale=args.scale,
                               data_root=args.data, **own_model_flags(args))
        args.model, args.recipe = args.model or models.spec.name, models.recipe.name
    else:
        args.recipe = args.recipe or EVAL_RECIPE
        models = prepare(source, None,
                         None if args.recipe == FLOAT_ONLY else args.recipe,
                         data_root=args.data, progress=not args.json)
    float_only = models.quant_model is None
    args.scale = models.scale  # an own model's scale is found by running it
    ort_runner = None
    if args.runtime == "onnxruntime":  # exported first: a recipe ONNX cannot take fails now
        if float_only:
            raise FxquantError("--runtime onnxruntime runs the quantized model, and --recipe fp "
                               "has none; give a static uniform recipe (e.g. mse-w8a8-sym)")
        from fxquant.deploy.ort import runner_for
        ort_runner = runner_for(models.quant_model)
    results = {}
    for which in ("fp",) if float_only else ("fp", "quant"):
        runner = ort_runner if which == "quant" and ort_runner else models.runner(which)
        scores = evaluate_sets(runner, models.spec, args.scale, datasets,
                               data_root=args.data, limit=args.limit, progress=not args.json,
                               label=which)
        for ds, score in scores.items():
            results.setdefault(ds, {})[which] = {"psnr": round(score.psnr, 4),
                                                 "ssim": round(score.ssim, 4)}
    report = {"model": args.model, "scale": args.scale, "recipe": args.recipe,
              "datasets": results}
    if args.compiled:
        report["compiled"] = args.compiled
    if args.runtime != "torch":
        report["runtime"] = args.runtime
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.model} x{args.scale}, recipe {args.recipe}"
          + (f", compiled model {args.compiled}" if args.compiled else "")
          + (f" (first {args.limit} images per set)" if args.limit else ""))
    if float_only:
        print(f"{'dataset':<10} {'FP PSNR':>8} {'FP SSIM':>8}")
        for ds, r in results.items():
            print(f"{ds:<10} {r['fp']['psnr']:>8.3f} {r['fp']['ssim']:>8.4f}")
        return 0
    print(f"{'dataset':<10} {'FP PSNR':>8} {'FP SSIM':>8} {'Q PSNR':>8} {'Q SSIM':>8} {'ΔPSNR':>7}")
    for ds, r in results.items():
        print(f"{ds:<10} {r['fp']['psnr']:>8.3f} {r['fp']['ssim']:>8.4f} {r['quant']['psnr']:>8.3f} "
              f"{r['quant']['ssim']:>8.4f} {r['quant']['psnr'] - r['fp']['psnr']:>+7.3f}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    import fxquant
    from fxquant.files import check_output_dir, check_output_path
    from fxquant.models.user import source_from_args
    from fxquant.workflow import prepare

    check_output_path(args.out, "compiled model (--out)")  # before compiling, not after
    if args.dump_dir:
        check_output_dir(args.dump_dir, "dump folder (--dump-dir)")
    source = source_from_args(args)
    models = prepare(source, None, args.recipe, data_root=args.data, progress=True,
                     dump_dir=args.dump_dir)
    fxquant.save(models.quant_model, args.out, model_name=None if source.is_user else args.model,
                 scale=models.scale, user_model=source.reference())
    gm = models.quant_model
    summary = {"out": args.out, "pipeline": gm.fxquant_pipeline,
               "passes": [{"pass": p, "wall_s": round(seconds, 2), **info} for (p, info), seconds
                          in zip(gm.fxquant_history, gm.fxquant_pass_seconds)]}
    print(json.dumps(summary) if args.json else
          f"saved {args.out}\npipeline: {summary['pipeline']}\n" +
          "\n".join(f"  {p['pass']} ({p['wall_s']:.1f} s): {p}" for p in summary["passes"]))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from fxquant.files import atomic_write_text, check_format_suffix, check_output_path
    from fxquant.graphviz import GRAPH_SUFFIXES
    from fxquant.inspect import graph_table, node_rows
    from fxquant.workflow import load_compiled, prepare, refuse_with_compiled

    if args.out:
        check_output_path(args.out, "inspect output (--out)")
        check_format_suffix(args.out, args.format, GRAPH_SUFFIXES)
    if args.compiled:  # --model and --scale, if given, must be the file's
        refuse_with_compiled(recipe=args.recipe)
        gm = load_compiled(args.compiled, model=args.model, scale=args.scale,
                           data_root=args.data).quant_model
    else:
        if not (args.model and args.scale and args.recipe):
            raise FxquantError("inspect needs --compiled FILE, or --model, --scale and --recipe")
        gm = prepare(args.model, args.scale, args.recipe, data_root=args.data).quant_model
    if args.json:
        text = json.dumps({"nodes": node_rows(gm)}, default=str) + "\n"
    elif args.format == "text":
        text = graph_table(gm)
    else:
        from fxquant.graphviz import render

        title = args.compiled or f"{args.model} x{args.scale} {args.recipe}"
        text = render(gm, args.format, title=title)
    if args.out:
        atomic_write_text(args.out, text, "inspect output (--out)")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fxquant.files import check_output_path
    from fxquant.models.user import is_user_model, own_model_flags, source_from_args
    from fxquant.report import ReportConfig, load_models, write_report
    from fxquant.workflow import load_compiled, prepare, refuse_with_compiled

    check_output_path(args.out, "report (--out)")  # before the analyses, not after
    if Path(args.out).suffix.lower() not in (".html", ".htm"):
        raise FxquantError(f"--out {args.out}: the report is one self-contained HTML page; "
                           "give a .html path")
    if args.compiled:
        refuse_with_compiled(recipe=args.recipe)
    datasets = dataset_list(args.datasets, args.data)
    own = own_model_flags(args)
    if args.compiled:  # zoo or own model, whichever the file holds
        models = load_compiled(args.compiled, model=args.model, scale=args.scale,
                               data_root=args.data, **own)
    elif is_user_model(args.model):
        if not args.recipe:
            raise FxquantError("give --recipe (a preset or .toml) to compile your model")
        models = prepare(source_from_args(args), None, args.recipe, data_root=args.data)
    else:
        models = load_models(model=args.model, scale=args.scale, recipe=args.recipe,
                             data_root=args.data, checkpoint=own["weights"])
    config = ReportConfig(datasets=datasets, limit=args.limit,
                          analysis_images=args.images, crop=args.crop, worst=args.worst,
                          sweep=not args.no_sweep, graph=not args.no_graph,
                          speed=not args.no_speed)
    progress = None if args.quiet else (lambda m: print(f"  {m} ...", file=sys.stderr))
    report = write_report(args.out, models, config=config, data_root=args.data, progress=progress)
    print(report.summary())
    print(f"wrote {args.out}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from fxquant.results import run_table

    run_table(args.config, args.out, data_root=args.data, force=args.force,
              dry_run=args.dry_run, force_recipes=args.force_recipe or ())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fxquant.demo import run

    return run(args.data)


def cmd_export(args: argparse.Namespace) -> int:
    from fxquant.deploy.cli import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from fxquant.bench import run

    args.argv = sys.argv[sys.argv.index("bench") + 1:] if "bench" in sys.argv else []
    return run(args)


def cmd_upscale(args: argparse.Namespace) -> int:
    from fxquant.upscale import run

    return run(args)


def cmd_train(args: argparse.Namespace) -> int:
    from fxquant.train.cli import run

    return run(args)


def cmd_models(args: argparse.Namespace) -> int:
    from fxquant.models import available_models, get_spec

    for name in available_models():
        spec = get_spec(name)
        weights = "pretrained" if spec.weight_files else "no weights here"
        print(f"{name:<14} x{','.join(map(str, spec.scales)):<6} {spec.color:<4} {weights:<16} "
              f"{spec.description}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from fxquant.recipe import available_presets, load_preset

    for name in available_presets():
        r = load_preset(name)
        print(f"{name:<19} {r.method:<8} w{r.weights.bits}a{r.activations.bits}  {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("eval", help="FP vs quantized PSNR/SSIM of a zoo or own model "
                                    f"(recipe {EVAL_RECIPE} unless --recipe or --compiled)")
    p.add_argument("--compiled", help="a saved compiled model (fxquant compile, fxquant train) "
                                      "instead of --recipe; --model only for an own model")
    add_model_args(p, model_required=False)  # --recipe defaults to EVAL_RECIPE, not with --compiled
    p.add_argument("--datasets", default="Set5", help="comma-separated: Set5,Set14,B100,Urban100")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of each set")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), default="torch",
                   help="run the quantized model in torch (fake-quant) or export it to ONNX and "
                        "run it in ONNX Runtime (integer kernels; static uniform and I²NQ recipes)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compile", help="compile a zoo model and save it")
    add_model_args(p, "minmax-w8a8")
    p.add_argument("--out", required=True, help="output file (.fxq)")
    p.add_argument("--dump-dir", help="write the graph after every pass to this folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="print the graph with each node's quantizer")
    add_model_source_args(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--format", choices=("text", "dot", "html"), default="text",
                   help="node table (text), Graphviz DOT, or a self-contained HTML/SVG view")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="self-contained HTML report: quality, per-layer error, "
                                      "sensitivity, distributions, image crops")
    p.add_argument("--compiled", help="a saved compiled model (instead of --model/--recipe)")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--scale", type=positive_int, help="upscaling factor")
    p.add_argument("--recipe", help="preset name or .toml recipe")
    p.add_argument("--checkpoint", help="float weights instead of the pretrained ones")
    add_own_model_args(p)
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.add_argument("--datasets", default="Set5", help="comma-separated benchmark sets")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images of each set")
    p.add_argument("--images", type=positive_int, default=2,
                   help="images (of the first set) the analyses run on (default 2)")
    p.add_argument("--crop", type=non_negative_int, default=48,
                   help="centred LR crop side for the analyses, 0 = whole images (default 48)")
    p.add_argument("--worst", type=positive_int, default=3, help="layers to highlight and plot")
    p.add_argument("--no-sweep", action="store_true", help="skip the sensitivity sweep")
    p.add_argument("--no-graph", action="store_true", help="leave the graph drawing out")
    p.add_argument("--no-speed", action="store_true",
                   help="skip the short FP32 vs lowered timing in the headline")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--out", required=True, help="output HTML file")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("table", help="run a models x scales x recipes x datasets matrix into Markdown")
    p.add_argument("--config", default="docs/results/uniform.toml",
                   help="TOML file of [[run]] tables; results go to the .json beside it")
    p.add_argument("--out", default="docs/results.md",
                   help="Markdown rendered from every store in the config's folder")
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.add_argument("--force", action="store_true",
                   help="recompute every cell of the config, even those stored and up to date")
    p.add_argument("--force-recipe", action="append", metavar="RECIPE",
                   help="recompute the cells of this recipe (repeatable): time them again")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells that would be computed (and why); write nothing")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("demo", help="IMDN x4 on Set5: 4-bit uniform and I²NQ against FP, then "
                       "8-bit lowered to int8 and timed")
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="latency, peak memory and Set5 PSNR of FP32, bf16, "
                                     "compiled, fake-quant, lowered and torch int8 variants")
    from fxquant.bench import build_parser as bench_parser

    bench_parser(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a compiled model as ONNX (ONNX Runtime int8) or a "
                                      "torch.export program, and check the file against it")
    from fxquant.deploy.cli import build_parser as export_parser

    export_parser(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("upscale", help="super-resolve an image or a folder of images (PNG out)")
    p.add_argument("input", help="an image (PNG, JPEG, WebP, BMP) or a folder of them")
    p.add_argument("--out", required=True,
                   help="output .png (one image) or folder (<stem>_x<scale>.png inside)")
    p.add_argument("--compiled", help="a saved compiled model")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--scale", type=positive_int, help="upscaling factor (zoo models)")
    p.add_argument("--recipe", help="with --model: a preset or .toml compiled here, or `fp` "
                                    "for the float model")
    p.add_argument("--checkpoint", help="zoo model weights instead of the pretrained ones")
    add_own_model_args(p)
    p.add_argument("--lower", choices=("cpu", "reference", "gpu"),
                   help="run the integer model (fxquant.lowered_copy) instead of fake-quant; "
                        "gpu: the Triton int8 target on a CUDA GPU")
    p.add_argument("--lower-options", metavar="KEY=VALUE,...",
                   help="the lower pass's options, as in a pipeline: e.g. "
                        "compile=true,planes=1 (faster, docs/passes.md 'lower')")
    p.add_argument("--tile", type=non_negative_int,
                   help="largest LR tile side (default 512; 0 = whole image at once)")
    p.add_argument("--overlap", type=non_negative_int,
                   help="LR pixels of context around each tile (default: twice the measured "
                        "receptive-field radius + 4)")
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    p.set_defaults(func=cmd_upscale)

    p = sub.add_parser("train", help="quantization-aware training of a compiled model from its "
                                     "PTQ start (weights and quantizer steps; DDP under torchrun)")
    from fxquant.train.cli import build_parser as train_parser

    train_parser(p)
    p.set_defaults(func=cmd_train)

    sub.add_parser("models", help="list zoo models").set_defaults(func=cmd_models)
    sub.add_parser("recipes", help="list recipe presets").set_defaults(func=cmd_recipes)
    return parser


def _ignore_file_size_signal() -> None:
    """Past a file-size limit (ulimit -f) a write then fails with EFBIG, reported as an
    error with the old file kept, instead of SIGXFSZ killing the process mid-write."""
    if hasattr(signal, "SIGXFSZ"):
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except ValueError:  # not the main thread: leave the signal alone
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ignore_file_size_signal()
    try:
        return args.func(args)
    except FxquantError as exc:
        print(f"fxquant {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
