"""``fxquant bench``: end-to-end latency, peak memory and Set5 PSNR of a model's variants.

Variants (FP32 eager is the 1.0): FP32 channels-last, FP32 ``torch.compile``, bf16 autocast,
fxquant fake-quant, fxquant lowered ``reference`` and ``cpu`` (Inductor-compiled; ``lowered cpu
1-plane``, when named, with one int8 plane of DAQ's/DFSQ's folded weights), ONNX Runtime
on fxquant's ONNX export and on the float model's (``ort_int8``, ``ort_fp32``,
``fxquant.deploy``), torch.ao
FX int8 and torchao PT2E int8 (``fxquant.bench_variants``). Everything runs in one process:
every variant is built and warmed up, then each round calls every variant once in turn
(interleaved, so load changes hit all alike); the table gives the median time and the
median, min and max of the per-round ratio to FP32 eager (or ``--baseline``), and how many
rounds each variant won against it with a one-sided sign test (:func:`sign_test`).

Peak memory is the largest growth of the C heap in use during one forward, sampled by a
thread (torch's CPU allocator has no peak counter; see :func:`peak_memory_mb`).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fxquant.bench_table import SECTION, render
from fxquant.bench_variants import BUILDERS, Variant, VariantUnavailable
from fxquant.cli_args import positive_int
from fxquant.errors import FxquantError
from fxquant.heap import OFF_SWITCH, keep_freed_blocks

FXQUANT_VARIANTS = ("fake-quant", "lowered reference", "lowered cpu", "lowered cpu 1-plane",
                    "lowered cpu 1-plane u8", "ort_int8", "ort_fp32")
BREAKDOWN_VARIANTS = ("fp32_eager", "lowered cpu", "lowered cpu 1-plane",
                      "lowered cpu 1-plane u8", "pt2e_int8")
ORDER = ("fp32_eager", "fp32_channels_last", "fp32_compile", "bf16_autocast", *FXQUANT_VARIANTS,
         "torch_ao_fx_int8", "pt2e_int8")
# run only when named in --variants: one plane differs from "lowered cpu" for DAQ/DFSQ alone,
# one-byte subset codes for DFSQ alone
OPTIONAL = ("lowered cpu 1-plane", "lowered cpu 1-plane u8")
DEFAULT_ORDER = tuple(name for name in ORDER if name not in OPTIONAL)
LOWERED = {"lowered reference": {"target": "reference"},
           "lowered cpu": {"target": "cpu", "compile": True},
           "lowered cpu 1-plane": {"target": "cpu", "compile": True, "planes": 1},
           "lowered cpu 1-plane u8": {"target": "cpu", "compile": True, "planes": 1,
                                      "subset_codes": "u8"}}


@dataclass
class Row:
    model: str
    variant: str
    median_ms: float | None = None
    ratio: float | None = None  # the baseline's time / this variant's time (>1 = faster)
    ratio_min: float | None = None
    ratio_max: float | None = None
    peak_mb: float | None = None
    psnr: float | None = None
    note: str = ""
    faster_rounds: int | None = None  # rounds in which it beat the baseline (ties left out)
    paired_rounds: int | None = None  # rounds compared (ties left out)
    sign_p: float | None = None  # one-sided sign test: faster in more than half the rounds


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_bytes() -> int | None:
    """Bytes in use on the C heap (glibc ``mallinfo2``: arena + mmapped blocks); None where
    the C library has no ``mallinfo2``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Largest growth (MiB) of C-heap bytes in use while ``fn`` runs once, sampled every
    0.2 ms (torch's CPU allocator and oneDNN both allocate through malloc; the resident set
    would not show memory that the allocator reuses)."""
    base = _heap_bytes()
    if base is None:
        return None
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _heap_bytes())
            time.sleep(0.0002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return (max(peak[0], _heap_bytes()) - base) / 2 ** 20


def op_breakdown(fn: Callable[[], object], rounds: int = 3, top: int = 8
                 ) -> list[tuple[str, float, float]]:
    """``(op, ms per call, share of the call)`` of the ops with the most self CPU time in
    ``fn`` (torch profiler; Inductor kernels are named when compiled with
    ``torch._inductor.config.cpp.enable_kernel_profile``)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                fn()
    events = [e for e in prof.key_averages() if not e.key.startswith(("## Call", "Torch-Compiled"))]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1e3 / rounds, e.self_cpu_time_total / total)
            for e in events[:top]]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 2
                ) -> dict[str, list[float]]:
    """Seconds per call of each function, ``rounds`` times, one call of each per round."""
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def median_table(rows: list) -> str:
    """A two-column Markdown table (case, median ms) of :func:`summarize` rows, for the
    single-op benchmarks in tools/."""
    return "\n".join(["| case | median ms |", "|---|---|",
                      *(f"| {row.variant} | {row.median_ms:.1f} |" for row in rows)])


def summarize(model: str, times: dict[str, list[float]], baseline: str = "fp32_eager"
              ) -> list[Row]:
    """One row per variant: median time and the per-round ratios against ``baseline`` (none
    when the baseline could not be built for this model, e.g. PT2E on CARN-M)."""
    base = times.get(baseline)
    rows = []
    for name, t in times.items():
        row = Row(model, name, 1e3 * statistics.median(t))
        if base is not None:
            ratios = [b / v for b, v in zip(base, t)]
            row.ratio, row.ratio_min, row.ratio_max = \
                statistics.median(ratios), min(ratios), max(ratios)
            if name != baseline:
                row.faster_rounds, row.paired_rounds, row.sign_p = sign_test(ratios)
        rows.append(row)
    return rows


def sign_test(ratios: list[float]) -> tuple[int, int, float]:
    """(rounds faster, rounds compared, p): the one-sided sign test of "faster in more than
    half the rounds", distribution-free, so one slow spell of the machine cannot decide it the
    way it can move a median of a few rounds. Ties are left out, as the test prescribes."""
    from scipy.stats import binomtest

    faster = sum(r > 1 for r in ratios)
    compared = faster + sum(r < 1 for r in ratios)
    p = binomtest(faster, compared, 0.5, alternative="greater").pvalue if compared else 1.0
    return faster, compared, float(p)


def fxquant_variants(model, calib: torch.Tensor, recipe, example: torch.Tensor,
                     concrete_args: dict | None, input_range: float = 1.0,
                     names=DEFAULT_ORDER) -> list[Variant]:
    """Fake-quant and the lowered targets among ``names`` (:data:`LOWERED`), all from one
    compile of ``recipe`` (``input_range``: 255 for an own model that takes 0..255)."""
    import fxquant

    ranged = {"input_range": (0.0, input_range)} if input_range != 1 else {}
    fake = fxquant.compile(model, recipe, calib=calib, concrete_args=concrete_args, **ranged)
    variants = [Variant("fake-quant", fake, f"fxquant {fake.fxquant_recipe.name} fake-quant graph")]
    for name, options in LOWERED.items():
        if name not in names:
            continue
        lowered = fxquant.lowered_copy(fake, **options)
        if options.get("compile"):
            with torch.inference_mode():
                lowered(example)  # compile now, outside the timed rounds
        text = ",".join(f"{k}={str(v).lower()}" for k, v in options.items())
        variants.append(Variant(name, lowered, f"lower{{{text}}}"))
    return variants


def build_all(model, example, calib_batches, calib, recipe, concrete_args, names=None,
              input_range: float = 1.0) -> tuple[list[Variant], dict[str, str]]:
    names = list(names or DEFAULT_ORDER)
    built, missing = [], {}
    ours = {v.name: v for v in fxquant_variants(model, calib, recipe, example, concrete_args,
                                                input_range, names)} \
        if set(FXQUANT_VARIANTS) & set(names) else {}
    for name in names:
        if name in ours:
            built.append(ours[name])
            continue
        if name in ("ort_int8", "ort_fp32"):  # ONNX Runtime on ONNX exports (fxquant.deploy)
            from fxquant.deploy.bench import build_ort_fp32, build_ort_int8
            try:
                built.append(build_ort_int8(ours["fake-quant"].fn, example) if name == "ort_int8"
                             else build_ort_fp32(model, example, concrete_args))
            except VariantUnavailable as exc:
                missing[name] = exc.reason
            continue
        try:
            built.append(BUILDERS[name](model, example, calib_batches,
                                        concrete_args=concrete_args))
        except VariantUnavailable as exc:
            missing[name] = exc.reason
    return built, missing


def rows_to_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(r) for r in rows]


# ----------------------------------------------------------------------------- command
DEFAULT_MODELS = "imdn,pan,carn_m,fsrcnn,edsr_baseline"


def bench_model(name: str, args) -> list:
    from fxquant.models.user import own_model_flags, resolve_model
    from fxquant.recipe import resolve_recipe
    from fxquant.workflow import calibration_data, evaluate_sets, with_range

    # a zoo name or an own model (file.py:Class with --weights/--init/--color/--range)
    source = resolve_model(name, args.scale, **own_model_flags(args))
    spec = source.spec
    recipe = resolve_recipe(args.recipe)
    pretrained = bool(spec.weight_files) or bool(source.weights)
    model = source.build(args.data, pretrained=pretrained).eval()
    channels = spec.channels
    torch.manual_seed(0)
    example = torch.rand(1, channels, args.size, args.size) * source.value_range
    if pretrained:
        calib = calibration_data(spec, args.scale, recipe, args.data)
    else:
        calib = torch.rand(recipe.calibration.num_patches, channels,
                           recipe.calibration.patch_size,
                           recipe.calibration.patch_size) * source.value_range
    # one image per batch: PT2E exports with the example's batch size of 1
    batches = list(calib.split(1))
    concrete = {"scale": args.scale} if spec.takes_scale else None
    names = variant_names(args)
    variants, missing = build_all(model, example, batches, calib, recipe, concrete, names,
                                  float(source.value_range))
    fns = {v.name: (lambda f=v.fn: f(example)) for v in variants}
    rows = summarize(name, interleaved(fns, args.rounds), baseline=args.baseline)
    notes = {v.name: v.note for v in variants}
    for row in rows:
        row.note = notes[row.variant]
        with torch.inference_mode():
            peak = peak_memory_mb(fns[row.variant])
            row.peak_mb = None if peak is None else round(peak, 1)
        if pretrained and not args.no_psnr:
            fn = next(v.fn for v in variants if v.name == row.variant)
            try:
                score = evaluate_sets(with_range(fn, spec), spec, args.scale, ["Set5"],
                                      data_root=args.data)
                row.psnr = round(score["Set5"].psnr, 4)
            except Exception as exc:  # noqa: BLE001 - a variant failing on other sizes is reported
                row.note += f"; PSNR failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    rows += [Row(name, v, note=f"unavailable: {why}") for v, why in missing.items()]
    breakdown = {v: op_breakdown(fns[v]) for v in BREAKDOWN_VARIANTS if v in fns} \
        if name in args.breakdown.split(",") else {}
    return rows, breakdown


def variant_names(args) -> list[str]:
    """The variants to build (``--variants`` or all), checked, with the ``--baseline`` one."""
    names = [n.strip() for n in args.variants.split(",")] if args.variants \
        else list(DEFAULT_ORDER)
    unknown = [n for n in names + [args.baseline] if n not in ORDER]
    if unknown:
        raise FxquantError(f"unknown variant '{unknown[0]}'; valid: {', '.join(ORDER)}")
    if args.baseline not in names:
        raise FxquantError(f"--baseline {args.baseline} is not among --variants "
                           f"{', '.join(names)}: add it, the ratios are taken against it")
    return names


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fxquant bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help="comma-separated zoo names, or path/to/file.py:ClassName")
    parser.add_argument("--scale", type=int, default=4)
    for flag, text in (("--weights", "own model's weights (.pth or .safetensors)"),
                       ("--init", "own model's constructor arguments, a JSON object"),
                       ("--color", "own model's input: rgb or y"),
                       ("--range", "own model's pixel range: 1 or 255")):
        parser.add_argument(flag, help=text, **({"type": int, "choices": (1, 255)}
                                                if flag == "--range" else {}))
    parser.add_argument("--size", type=positive_int, default=256,
                        help="LR input side (default 256)")
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--recipe", default="mse-w8a8-sym-outputs")
    parser.add_argument("--variants", help="comma-separated subset (default: all but "
                        f"{', '.join(OPTIONAL)}; valid: {', '.join(ORDER)})")
    parser.add_argument("--baseline", default="fp32_eager",
                        help="the variant each per-round ratio is taken against (default "
                             "fp32_eager; e.g. pt2e_int8 to compare two int8 paths directly)")
    parser.add_argument("--no-psnr", action="store_true", help="skip the Set5 evaluation")
    parser.add_argument("--breakdown", default="",
                        help="comma-separated models to profile op by op (FP32 eager, lowered "
                             "cpu, PT2E int8)")
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--write", help="replace this tool's section of this Markdown file")
    parser.add_argument("--section", default=SECTION,
                        help=f"the '## ' heading of that section (default '{SECTION}')")
    return parser


def run(args) -> int:
    from fxquant.files import atomic_write_text, check_output_path
    from fxquant.markdown import write_section

    if not args.section.startswith("## ") or "\n" in args.section:
        raise FxquantError(f"--section '{args.section}' must be one Markdown '## ' heading line")
    for path, what in ((args.json, "bench JSON (--json)"), (args.write, "Markdown (--write)")):
        if path:  # before the (long) measurements
            check_output_path(path, what)
    variant_names(args)  # an unknown variant or baseline fails now, not after the first model

    # freed feature maps stay on the heap for every variant alike (fxquant/heap.py; the lower
    # pass would set it anyway, part-way through); FXQUANT_KEEP_HEAP=0 measures glibc's defaults
    keep_freed_blocks()
    if args.breakdown:  # name Inductor's kernels in the profile (before anything compiles)
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    rows, breakdowns = [], {}
    for name in args.models.split(","):
        model_rows, breakdown = bench_model(name.strip(), args)
        rows += model_rows
        if breakdown:
            breakdowns[name.strip()] = breakdown
        print(render(rows, args, "(partial)", breakdowns), file=sys.stderr, flush=True)
    # allocator settings change every variant's times: the command records them
    malloc = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                      if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", OFF_SWITCH))
    command = (malloc + " " if malloc else "") + "fxquant bench " + shlex.join(args.argv)
    text = render(rows, args, command.strip(), breakdowns)
    print(text)
    if args.json:
        atomic_write_text(args.json, json.dumps([asdict(r) for r in rows], indent=1),
                          "bench JSON (--json)")
    if args.write:
        write_section(args.write, args.section, text)
    return 0
