"""``make demo`` (``fxquant demo``): IMDN ×4 on Set5 with two 4-bit presets against FP
(``fxquant eval`` each), then ``mse-w8a8-sym-outputs`` lowered to oneDNN int8
(``lower{target=cpu}``), its Set5 PSNR beside FP and fake-quant, and its speed against FP32
eager. :func:`measure_lowered` computes the second half's numbers; :func:`lowered_table`
renders them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxquant.bench import Row

# int8 weights, conv outputs quantized where float ops read them: the fastest measured
# deployment recipe (docs/performance.md)
RECIPE = "mse-w8a8-sym-outputs"
INPUT = (1, 3, 128, 128)
ROUNDS = 5
# the 4-bit half: uniform PTQ, then fxquant's most accurate preset that compiles in under a
# minute (docs/results.md; the reconstruction presets take 10-15 minutes)
RECIPES_4BIT = (("mse-w4a4", "the 4-bit uniform preset"),
                ("i2nq-w4a4", "I²NQ at 4 bits (non-uniform levels, flex-scale weights)"))


@dataclass
class LoweredDemo:
    """Set5 PSNR of the FP, fake-quant and lowered models, and the timing rows of FP32 eager
    and the lowered model."""

    psnr: dict[str, float]
    fp32: Row
    lowered: Row
    threads: int
    saturating_cpu: bool = False  # no VNNI: the exact int8 path runs two weight planes


def measure_lowered(data: str | None) -> LoweredDemo:
    import fxquant
    from fxquant.bench import interleaved, summarize
    from fxquant.lower.int8_pairs import int8_pairs_saturate
    from fxquant.workflow import evaluate_sets, prepare

    zoo = prepare("imdn", 4, RECIPE, data_root=data, progress=True)
    fake = zoo.quant_model
    # PSNR from the eager lowered model (Set5's five image sizes would each recompile the
    # Inductor one), timing from the compiled one: the same integer ops
    eager = fxquant.lowered_copy(fake, "cpu")
    compiled = fxquant.lowered_copy(fake, "cpu", compile=True)
    psnr = {name: evaluate_sets(fn, zoo.spec, 4, ["Set5"], data_root=data)["Set5"].psnr
            for name, fn in (("fp", zoo.float_model), ("fake", fake), ("lowered", eager))}
    x = torch.rand(*INPUT)
    fns = {"fp32_eager": lambda: zoo.float_model(x), "lowered": lambda: compiled(x)}
    print(f"compiling the lowered model with Inductor and timing ({'x'.join(map(str, INPUT))}, "
          f"{ROUNDS} rounds)...")
    rows = {r.variant: r for r in summarize("imdn", interleaved(fns, rounds=ROUNDS))}
    return LoweredDemo(psnr, rows["fp32_eager"], rows["lowered"], torch.get_num_threads(),
                       int8_pairs_saturate())


def lowered_table(demo: LoweredDemo) -> str:
    """The demo's table: one line per model, PSNR, median latency and the speed-up over FP32
    eager (with the per-round range)."""
    low = demo.lowered
    note = ["this CPU has no VNNI: its int8 pairs saturate, so each 8-bit conv runs two weight "
            "planes to stay exact (docs/lowering.md, 'CPUs without VNNI');\nthe int8 speed-ups "
            "in docs/performance.md were measured on CPUs with VNNI"] if demo.saturating_cpu else []
    return "\n".join([
        f"{'model':<28} {'Set5 PSNR':>9} {'latency':>10} {'speed-up':>9}",
        f"{'FP32 eager':<28} {demo.psnr['fp']:>9.3f} {demo.fp32.median_ms:>8.1f}ms {'1.00x':>9}",
        f"{'W8A8 fake-quant (float)':<28} {demo.psnr['fake']:>9.3f} {'':>10} {'':>9}",
        f"{'W8A8 lowered, oneDNN int8':<28} {demo.psnr['lowered']:>9.3f} "
        f"{low.median_ms:>8.1f}ms {low.ratio:>8.2f}x  (per-round {low.ratio_min:.2f}-"
        f"{low.ratio_max:.2f}x, {demo.threads} threads)"] + note)


def eval_args(data: str | None, recipe: str):
    """A 4-bit step as ``fxquant eval`` arguments, parsed by the eval parser itself, so that
    every option eval reads has its default (a hand-built namespace missed one)."""
    from fxquant.cli import build_parser

    return build_parser().parse_args(["eval", "--model", "imdn", "--scale", "4", "--recipe",
                                      recipe, "--datasets", "Set5"]
                                     + (["--data", data] if data else []))


def run(data: str | None) -> int:
    """The whole demo; a non-zero exit code of a step stops it."""
    from fxquant import cli

    for recipe, what in RECIPES_4BIT:
        print(f"fxquant demo: IMDN x4 compiled with {what} ({recipe})")
        code = cli.cmd_eval(eval_args(data, recipe))
        if code:
            return code
    print(f"\nInteger execution: IMDN x4, {RECIPE} lowered to oneDNN int8 (lower{{target=cpu}})")
    print(lowered_table(measure_lowered(data)))
    return 0
