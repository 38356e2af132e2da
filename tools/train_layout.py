"""Time one training step (forward, L1 against the float model, backward) of a quantized zoo
model with NCHW and with channels-last input, interleaved, in one process:

    python tools/train_layout.py --models pan,imdn,carn_m --recipe i2nq-w4a4 --rounds 7

This is the step the ``reconstruct`` pass (``channels_last``) and ``fxquant train``
(``--channels-last``) repeat: every quantizer's parameters trainable, a batch of the recipe's
calibration patches. Prints a Markdown table of median seconds and the median per-round
ratio (NCHW time / channels-last time: above 1, channels-last is faster). Run it with nothing
else on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def step_times(model: str, scale: int, recipe_name: str, rounds: int, batch: int,
               data_root: str | None) -> dict[str, list[float]]:
    import fxquant
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
    inputs = {"nchw": calib[:batch].contiguous(),
              "channels_last": calib[:batch].contiguous(memory_format=torch.channels_last)}
    with torch.no_grad():
        target = fxquant.trace(net, concrete_args=concrete)(inputs["nchw"])
    times: dict[str, list[float]] = {name: [] for name in inputs}
    # fxquant.bench.interleaved times under inference_mode, where nothing can backpropagate
    for round_ in range(rounds + 1):  # round 0 warms up
        for name, x in inputs.items():
            for p in params:  # as the optimizer's zero_grad(set_to_none=True)
                p.grad = None
            started = time.perf_counter()
            (gm(x) - target).abs().mean().backward()
            if round_:
                times[name].append(time.perf_counter() - started)
    return times


SECTION = "## Training step layout (tools/train_layout.py)"


def render(rows: dict[str, dict[str, list[float]]], args, command: str) -> str:
    lines = [SECTION, "", f"`{command}`", "",
             f"×{args.scale}, `{args.recipe}`, {args.batch} calibration patches per step, torch "
             f"threads {torch.get_num_threads()}, {args.rounds} interleaved rounds after one "
             "warm-up; ratio = NCHW time / channels-last time (above 1: channels-last is faster), "
             "median with the min–max of the per-round ratio.", "",
             "| model | NCHW s/step | channels-last s/step | NCHW / channels-last (min–max) |",
             "|---|---:|---:|---:|"]
    for model, times in rows.items():
        ratios = [a / b for a, b in zip(times["nchw"], times["channels_last"])]
        lines.append(f"| {model} | {statistics.median(times['nchw']):.3f} | "
                     f"{statistics.median(times['channels_last']):.3f} | "
                     f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="pan,imdn,carn_m")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--recipe", default="i2nq-w4a4")
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
                                     args.data)
    except FxquantError as exc:
        print(f"train_layout: error: {exc}", file=sys.stderr)
        return 2
    text = render(rows, args, tool_command("train_layout.py", argv))
    print(text, end="")
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
