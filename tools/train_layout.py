"""Time one training step (forward, L1 against the float model, backward) of a quantized zoo
model two ways, interleaved, in one process:

    python tools/train_layout.py --models pan,imdn,carn_m --recipe i2nq-w4a4 --rounds 7
    python tools/train_layout.py --compare gradient --models imdn,pan --rounds 21

``--compare layout`` (default): NCHW against channels-last input. ``--compare gradient``:
both channels-last, the non-uniform quantizers' clipped straight-through gradient as the
arithmetic ``q + (x − x.detach())·inside`` against the autograd function that replaced it
(fxquant.quant.nonuniform.ClippedStraightThrough); the tool also checks that both give every
parameter the same gradient, bit for bit.

This is the step the ``reconstruct`` pass (``channels_last``) and ``fxquant train``
(``--channels-last``) repeat: every quantizer's parameters trainable, a batch of the recipe's
calibration patches, freed blocks kept on the heap as in training (fxquant/heap.py). Prints
a Markdown table of median seconds and the median per-round ratio (first time / second
time: above 1, the second is faster). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from unittest import mock

import torch


def arithmetic_straight_through(x, q, lo, hi):
    """The form ClippedStraightThrough replaced (same values and gradients): the baseline of
    ``--compare gradient``."""
    return q + (x - x.detach()) * ((x >= lo) & (x <= hi))


COMPARISONS = {  # name → the two variants: (column, channels-last input, gradient form)
    "layout": (("NCHW", False, None), ("channels-last", True, None)),
    "gradient": (("arithmetic STE", True, arithmetic_straight_through),
                 ("autograd function", True, None)),
}


def step_times(model: str, scale: int, recipe_name: str, rounds: int, batch: int,
               data_root: str | None, compare: str = "layout") -> dict[str, list[float]]:
    import fxquant
    from fxquant.heap import keep_freed_blocks
    from fxquant.models import build_model, get_spec
    from fxquant.quant import Quantizer
    from fxquant.recipe import resolve_recipe
    from fxquant.workflow import calibration_data

    spec, recipe = get_spec(model), resolve_recipe(recipe_name)
    net = build_model(model, scale, pretrained=True, data_root=data_root).eval()
    calib = calibration_data(spec, scale, recipe, data_root)
    concrete = {"scale": scale} if spec.takes_scale else None
    gm = fxquant.compile(net, recipe, calib=calib, concrete_args=concrete)
    params = [p for module in gm.modules() if isinstance(module, Quantizer)
              for p in module.trainable_parameters()]
    with torch.no_grad():
        target = fxquant.trace(net, concrete_args=concrete)(calib[:batch].contiguous())
    keep_freed_blocks()  # as Trainer.run and QATTrainer.run do
    variants = COMPARISONS[compare]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    grads: dict[str, list[torch.Tensor]] = {}
    # fxquant.bench.interleaved times under inference_mode, where nothing can backpropagate
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, channels_last, form in variants:
            layout = torch.channels_last if channels_last else torch.contiguous_format
            x = calib[:batch].contiguous(memory_format=layout)
            for p in params:  # as the optimizer's zero_grad(set_to_none=True)
                p.grad = None
            swap = (mock.patch("fxquant.quant.nonuniform.clipped_straight_through", form)
                    if form else contextlib.nullcontext())
            with swap:
                started = time.perf_counter()
                (gm(x) - target).abs().mean().backward()
                elapsed = time.perf_counter() - started
            if round_:
                times[name].append(elapsed)
            grads[name] = [p.grad for p in params]
    if compare == "gradient":
        first, second = (grads[name] for name, _, _ in variants)
        if not all(torch.equal(a, b) for a, b in zip(first, second)):
            raise SystemExit(f"train_layout: {model}: the two gradient forms disagree")
    return times


SECTIONS = {"layout": "## Training step layout (tools/train_layout.py)",
            "gradient": "## Training step: the clipped straight-through gradient "
                        "(tools/train_layout.py)"}
NOTES = {"layout": "ratio = NCHW time / channels-last time (above 1: channels-last is faster)",
         "gradient": "both channels-last; ratio = arithmetic-STE time / autograd-function time "
                     "(above 1: the function is faster); both gave every parameter the same "
                     "gradient, bit for bit"}


def render(rows: dict[str, dict[str, list[float]]], args, command: str) -> str:
    compare = getattr(args, "compare", "layout")
    (first, _, _), (second, _, _) = COMPARISONS[compare]
    lines = [SECTIONS[compare], "", f"`{command}`", "",
             f"×{args.scale}, `{args.recipe}`, {args.batch} calibration patches per step, torch "
             f"threads {torch.get_num_threads()}, {args.rounds} interleaved rounds after one "
             f"warm-up; {NOTES[compare]}, median with the min–max of the per-round ratio.", "",
             f"| model | {first} s/step | {second} s/step | {first} / {second} (min–max) |",
             "|---|---:|---:|---:|"]
    for model, times in rows.items():
        ratios = [a / b for a, b in zip(times[first], times[second])]
        lines.append(f"| {model} | {statistics.median(times[first]):.3f} | "
                     f"{statistics.median(times[second]):.3f} | "
                     f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="pan,imdn,carn_m")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipe", default="i2nq-w4a4")
    parser.add_argument("--compare", choices=sorted(COMPARISONS), default="layout",
                        help="what the two timed variants differ in (default: layout)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8, help="patches per step (the recipe's "
                        "calibration batch size is 8)")
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--write", help="replace this script's section of a Markdown file "
                        "(e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    from fxquant.errors import FxquantError
    from fxquant.markdown import tool_command, write_section

    if args.rounds < 1 or args.batch < 1:
        print("train_layout: error: --rounds and --batch must be >= 1", file=sys.stderr)
        return 2
    rows = {}
    try:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            rows[model] = step_times(model, args.scale, args.recipe, args.rounds, args.batch,
                                     args.data, args.compare)
    except FxquantError as exc:
        print(f"train_layout: error: {exc}", file=sys.stderr)
        return 2
    text = render(rows, args, tool_command("train_layout.py", argv))
    print(text, end="")
    if args.write:
        write_section(args.write, SECTIONS[args.compare], text)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
