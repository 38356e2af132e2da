"""The Markdown section ``fxquant bench`` prints and writes: the table of its rows, the per-op
breakdowns, and the CPU, torch version and threads the timings ran on (:func:`render`)."""

from __future__ import annotations

import os
import platform

import torch

from fxquant.heap import freed_blocks_kept
from fxquant.lower.int8_pairs import int8_pairs_saturate

SECTION = "## Integer execution (fxquant bench)"
BASELINE_NAMES = {"fp32_eager": "FP32 eager", "pt2e_int8": "PT2E int8"}


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU the timings ran on, e.g. ``AMD EPYC (family 26, model 2), 2 logical CPUs``:
    int8 against float ratios move from one CPU generation to the next, so every table
    names its CPU. Linux's ``/proc/cpuinfo`` (the first processor), else ``platform``."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {os.cpu_count()} logical CPUs"


def int8_kind() -> str:
    """Whether this CPU's int8 convs accumulate exactly (VNNI) or run the split-weight path
    (docs/lowering.md, "CPUs without VNNI"): the lowered models' speed turns on it."""
    return ("no VNNI: 8-bit convs run two weight planes" if int8_pairs_saturate()
            else "int8 with VNNI")


def heap_description() -> str:
    """How freed memory was handled while the variants ran (they share the process)."""
    return ("freed blocks kept on the heap (fxquant/heap.py)" if freed_blocks_kept()
            else "glibc's default malloc settings or the user's own")


def render(rows: list, args, command: str, breakdowns: dict | None = None) -> str:
    """The Markdown section: the table, then ``{model: {variant: op_breakdown(...)}}``."""
    baseline = getattr(args, "baseline", "fp32_eager")
    baseline = BASELINE_NAMES.get(baseline, baseline)
    lines = [getattr(args, "section", None) or SECTION, "",
             f"`{command}`", "",
             f"×{args.scale}, 1×C×{args.size}×{args.size} LR input, {cpu_description()} "
             f"({int8_kind()}), "
             f"torch {torch.__version__}, torch threads "
             f"{torch.get_num_threads()}, {heap_description()}, {args.rounds} interleaved "
             "rounds after warm-up; ratio "
             f"= {baseline} time / variant time (higher is faster), median with the min–max of "
             f"the per-round ratio; faster in k/n: rounds in which the variant beat {baseline}, "
             "p: one-sided sign test of faster in most rounds. recipe "
             f"`{args.recipe}` for the fxquant variants. PSNR: "
             "Set5 Y, the variant itself run on every image. Peak MiB: largest growth of the C "
             "heap in use during one forward (activations and workspaces, not weights).", ""]
    lines += [f"| model | variant | median ms | speed-up vs {baseline} (min–max) | peak MiB | "
              "Set5 PSNR | how |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.median_ms is None:
            lines.append(f"| {r.model} | {r.variant} | — | — | — | — | {r.note} |")
            continue
        psnr = f"{r.psnr:.3f}" if r.psnr is not None else "—"
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "—"
        ratio = "—" if r.ratio is None else \
            f"{r.ratio:.2f}× ({r.ratio_min:.2f}–{r.ratio_max:.2f})"
        if r.faster_rounds is not None:
            ratio += f"; faster in {r.faster_rounds}/{r.paired_rounds}, p = {r.sign_p:.2g}"
        lines.append(f"| {r.model} | {r.variant} | {r.median_ms:.1f} | {ratio} | {peak} | "
                     f"{psnr} | {r.note} |")
    for model, variants in (breakdowns or {}).items():
        lines += ["", f"Per-op breakdown, {model} (self CPU time per forward, torch profiler):", ""]
        for variant, ops in variants.items():
            lines += [f"| {variant}: op | ms | share |", "|---|---|---|"]
            lines += [f"| `{op[:70]}` | {ms:.2f} | {100 * share:.0f} % |" for op, ms, share in ops]
            lines.append("")
    return "\n".join(lines) + "\n"
