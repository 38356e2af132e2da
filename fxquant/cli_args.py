"""The command line's argument types and shared flag groups: the checked integer and dataset-list
types, the own-model flags, the model flags of eval/compile, and the compiled-model source of
``inspect`` (also used by ``fxquant bench``, ``fxquant train`` and the tools/ scripts)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fxquant.errors import FxquantError


def dataset_list(text: str, data_root: str | None = None) -> list[str]:
    """The benchmark sets of ``--datasets``, each checked to exist under the data root: a
    misspelt name fails before the compile, not after it."""
    from fxquant.data.benchmark import check_sets

    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise FxquantError(f"--datasets {text!r} names no dataset; give a comma-separated "
                           "list such as Set5,Set14,B100,Urban100")
    check_sets("benchmark", names, data_root)
    return names


def _int_at_least(minimum: int, meaning: str):
    """An argparse type: an integer >= ``minimum`` (``--limit 0`` would evaluate nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {meaning}")
        return value
    return parse


positive_int = _int_at_least(1, "1 or more")
non_negative_int = _int_at_least(0, "0 or more")


def _finite_float(strictly_positive: bool, meaning: str):
    """An argparse type: a finite float > 0 (or >= 0); ``--budget nan`` would compare false
    with everything and silently mark nothing."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {meaning}")
        return value
    return parse


positive_float = _finite_float(True, "above 0")
non_negative_float = _finite_float(False, "0 or more")


MODEL_HELP = ("zoo model name (see `fxquant models`), or your own: path/to/file.py:ClassName "
              "or package.module:ClassName (with --weights, --init, --color, --range)")


def add_own_model_args(parser: argparse.ArgumentParser) -> None:
    """The flags that describe an own model (``--model file.py:Class``)."""
    parser.add_argument("--weights", help="own model's weights (.pth loaded with "
                                          "weights_only=True, or .safetensors)")
    parser.add_argument("--init", help="own model's constructor arguments as a JSON object, "
                                       "e.g. '{\"upscale\": 4}'")
    parser.add_argument("--color", choices=("rgb", "y"),
                        help="own model's input: rgb (1x3xHxW, default) or y (1x1xHxW luma)")
    parser.add_argument("--range", type=int, choices=(1, 255),
                        help="own model's pixel range: 1 ([0, 1], default) or 255")


def add_model_args(parser: argparse.ArgumentParser, recipe_default: str | None = None, *,
                   model_required: bool = True) -> None:
    parser.add_argument("--model", required=model_required, help=MODEL_HELP)
    parser.add_argument("--scale", type=positive_int,
                        help="upscaling factor (required for zoo models; found by running "
                             "an own model once)")
    parser.add_argument("--recipe", default=recipe_default,
                        help="preset name (see `fxquant recipes`) or path to a .toml recipe; "
                             "`eval --recipe fp` evaluates the float model alone")
    parser.add_argument("--checkpoint", help="load this checkpoint instead of the pretrained one")
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    add_own_model_args(parser)


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """A compiled model to inspect: a saved one (``--compiled``), or a zoo model compiled
    here (``--model/--scale/--recipe``). Shared by ``inspect`` and the tools/ scripts."""
    parser.add_argument("--compiled", help="a saved compiled model")
    parser.add_argument("--model")
    parser.add_argument("--scale", type=positive_int)
    parser.add_argument("--recipe")
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")


def add_lowered_timing_args(parser: argparse.ArgumentParser, rounds: int) -> None:
    """``MODEL RECIPE`` and the flags of the tools/ scripts that time one lowered zoo model
    (a random 1×C×S×S input, ``--rounds`` interleaved rounds, the folded convs' options)."""
    from fxquant.lower.subset import CODE_GRIDS

    parser.add_argument("model")
    parser.add_argument("recipe")
    parser.add_argument("--scale", type=positive_int, default=4)
    parser.add_argument("--size", type=positive_int, default=256)
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--planes", type=int, choices=(1, 2), default=1,
                        help="DAQ's/DFSQ's int8 weight planes (default 1; those models only)")
    parser.add_argument("--subset-codes", choices=CODE_GRIDS, default="exact",
                        help="DFSQ's codes (default exact; DFSQ models only)")
    parser.add_argument("--data", default=None, help="data root (default $FXQUANT_DATA)")


def lowered_timing_options(fake, planes: int, subset_codes: str) -> dict:
    """``lower``'s options for :func:`add_lowered_timing_args`' tools: compiled on cpu, with
    the folded convs' options where the model has DAQ (``planes``) or DFSQ (``planes``,
    ``subset_codes``) quantizers (elsewhere they would change nothing, and ``lower`` warns)."""
    from fxquant.quant.daq import DAQActivationQuantizer
    from fxquant.quant.subset import SubsetQuantizer

    options = {"target": "cpu", "compile": True}
    modules = list(fake.modules())
    if any(isinstance(m, (DAQActivationQuantizer, SubsetQuantizer)) for m in modules):
        options["planes"] = planes
    if any(isinstance(m, SubsetQuantizer) for m in modules):
        options["subset_codes"] = subset_codes
    return options


def prepare_lowered_timing(args: argparse.Namespace):
    """``(zoo, example)`` for :func:`add_lowered_timing_args`' tools: freed blocks kept on the
    heap (as ``fxquant bench``), ``args.recipe`` compiled for the zoo model, and a seeded
    random 1×C×S×S input."""
    import torch

    from fxquant.heap import keep_freed_blocks
    from fxquant.workflow import prepare

    keep_freed_blocks()
    zoo = prepare(args.model, args.scale, args.recipe, data_root=args.data)
    torch.manual_seed(0)
    return zoo, torch.rand(1, zoo.spec.channels, args.size, args.size)


def models_from_source_args(args: argparse.Namespace, datasets: list[str] = ()):
    """The FP and quantized models that :func:`add_model_source_args`' flags name (a saved
    compiled model, or a zoo model compiled here). ``datasets``, the benchmark sets the caller
    reads afterwards, are checked to exist first: a misspelt name fails before the compile."""
    from fxquant.data.benchmark import check_sets
    from fxquant.report import load_models

    check_sets("benchmark", datasets, args.data)

    return load_models(model=args.model, scale=args.scale, recipe=args.recipe,
                       compiled=args.compiled, data_root=args.data)


def run_tool(main) -> None:
    """Run a ``tools/`` script's ``main()`` and exit with its status; an :class:`FxquantError`
    (a misspelt model or recipe, a bad file) is printed as ``<tool>: error: <message>`` with
    status 2, as the ``fxquant`` command does, instead of a traceback."""
    try:
        status = main()
    except FxquantError as exc:
        print(f"{Path(sys.argv[0]).stem}: error: {exc}", file=sys.stderr)
        status = 2
    sys.exit(status)
