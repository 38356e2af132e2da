"""Dump a compiled graph as text, Graphviz DOT, SVG or a self-contained HTML view.

    python tools/graph_dump.py --compiled m.fxq --format html --out m.html
    python tools/graph_dump.py --model imdn --scale 4 --recipe minmax-w4a4 --format dot --errors
    python tools/graph_dump.py --model imdn --scale 4 --recipe minmax-w4a4 --dump-dir dumps \
        --formats text,dot,html          # the graph after every pass: dumps/NN-<pass>.*

``--errors`` colours quantized layers by their isolated SQNR on a few Set5 LR crops (red:
worst). Set OMP_NUM_THREADS=1 on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import sys

from fxquant.cli_args import (add_model_source_args, models_from_source_args, non_negative_int,
                              positive_int)
from fxquant.errors import FxquantError
from fxquant.files import (atomic_write_text, check_format_suffix, check_output_dir,
                           check_output_path)
from fxquant.graphviz import GRAPH_SUFFIXES


def dump_passes(args) -> None:
    from fxquant.graphviz import GraphDumper
    from fxquant.models import build_model, get_spec
    from fxquant.pipeline import PassContext, PassManager
    from fxquant.recipe import resolve_recipe
    from fxquant.workflow import calibration_data

    if not (args.model and args.scale and args.recipe):
        raise FxquantError("--dump-dir needs --model, --scale and --recipe")
    recipe = resolve_recipe(args.recipe)
    spec = get_spec(args.model)
    model = build_model(args.model, args.scale, pretrained=True, data_root=args.data)
    ctx = PassContext(recipe=recipe, calib=calibration_data(spec, args.scale, recipe, args.data),
                      concrete_args={"scale": args.scale} if spec.takes_scale else None)
    formats = [f for f in args.formats.split(",") if f]
    dumper = GraphDumper(args.dump_dir, formats=formats, ctx=ctx)
    PassManager(recipe.pipeline_spec, dump_dir=args.dump_dir, dump_fn=dumper).run(model, ctx)
    print(f"wrote {dumper.index} dumps ({', '.join(['text'] + dumper.formats)}) to {args.dump_dir}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(parser)
    parser.add_argument("--format", default="text", choices=("text", "dot", "svg", "html"))
    parser.add_argument("--out", help="output file (default: stdout)")
    parser.add_argument("--errors", action="store_true",
                        help="colour layers by isolated SQNR (needs the benchmark data)")
    parser.add_argument("--dataset", default="Set5")
    parser.add_argument("--images", type=positive_int, default=2)
    parser.add_argument("--crop", type=non_negative_int, default=48)
    parser.add_argument("--dump-dir", help="dump the graph after every pass of the recipe")
    parser.add_argument("--formats", default="text,dot", help="formats for --dump-dir")
    args = parser.parse_args(argv)
    try:
        if args.out:  # before any work: a missing or read-only folder fails now
            check_output_path(args.out, "graph (--out)")
            check_format_suffix(args.out, args.format, GRAPH_SUFFIXES)
        if args.dump_dir:
            check_output_dir(args.dump_dir, "dump folder (--dump-dir)")
            dump_passes(args)
            return 0
        from fxquant.analysis import benchmark_crops, layer_errors
        from fxquant.graphviz import render
        models = models_from_source_args(args, [args.dataset] if args.errors else [])
        errors = None
        if args.errors:
            inputs, _ = benchmark_crops(args.dataset, models.scale, images=args.images,
                                        crop=args.crop, color=models.spec.color, root=args.data)
            errors = layer_errors(models.float_model, models.quant_model, inputs,
                                  modes=("isolated",), float_fn=models.runner("fp"),
                                  quant_fn=models.runner("quant")).sqnr_map(key="node")
        title = args.compiled or f"{args.model} x{args.scale} {args.recipe}"
        text = render(models.quant_model, args.format, errors=errors, title=title)
    except FxquantError as exc:
        print(f"graph_dump: error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        try:
            atomic_write_text(args.out, text, "graph (--out)")
        except FxquantError as exc:
            print(f"graph_dump: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
