"""Time ``fxquant train`` steps with freed blocks kept on glibc's heap (the default,
:mod:`fxquant.heap`) and with glibc's own thresholds (``FXQUANT_KEEP_HEAP=0``), interleaved:

    python tools/train_heap.py --compiled start.fxq --steps 12 --rounds 2

Each run is a fresh ``fxquant train`` process from the saved compiled model ``--compiled``
(distillation from the float model, quantizers frozen, channels-last: the IMDN/PAN QAT
schedule of docs/methods/odm.md), since the setting is per process. Per run: the median
seconds per step after the first ``--warmup`` steps (from the run's metrics.jsonl), and the
run's user and system CPU seconds and minor page faults. Prints a Markdown table of the
medians over rounds and the median per-round ratio (off / kept: above 1, keeping the blocks
is faster). Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTION = "## Training with freed blocks kept on the heap (tools/train_heap.py)"
SETTINGS = {"kept": {}, "off": {"FXQUANT_KEEP_HEAP": "0"}}  # kept: fxquant's default
FIELDS = ("step_s", "user_s", "sys_s", "minflt")


def one_run(compiled: str, setting: str, args: argparse.Namespace, out: Path) -> dict:
    """One ``fxquant train`` process under ``setting``: its step time, CPU times and faults."""
    from fxquant.heap import malloc_settings

    # the user's own malloc settings would turn the default off: both runs go without them
    env = {k: v for k, v in os.environ.items() if k not in malloc_settings(os.environ)}
    command = [sys.executable, "-m", "fxquant.cli", "train", "--compiled", compiled,
               "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch),
               "--patch", str(args.patch), "--teacher-weight", "1", "--hr-weight", "0",
               "--quantizer-lr", "0", "--channels-last", "--log-every", "1", "--device", "cpu",
               "--quiet"]
    if args.data:
        command += ["--data", args.data]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, env={**env, **SETTINGS[setting]}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"fxquant train ({setting}) failed:\n{done.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"seconds"' in line]
    seconds = [row["seconds"] for row in rows]
    steps = [b - a for a, b in zip(seconds[args.warmup:], seconds[args.warmup + 1:])]
    return {"step_s": statistics.median(steps), "user_s": after.ru_utime - before.ru_utime,
            "sys_s": after.ru_stime - before.ru_stime, "minflt": after.ru_minflt - before.ru_minflt}


def render(runs: dict[str, list[dict]], args: argparse.Namespace, command: str) -> str:
    ratios = [off["step_s"] / kept["step_s"] for off, kept in zip(runs["off"], runs["kept"])]
    lines = [SECTION, "", f"`{command}`", "",
             f"`fxquant train` from `{Path(args.compiled).name}`, {args.steps} steps of "
             f"{args.batch} patches of {args.patch}², distillation from the float model, quantizers "
             f"frozen, channels-last; torch's default threads; {args.rounds} interleaved rounds, "
             f"one process per run; s/step = median step after the first {args.warmup}; CPU "
             "seconds and minor page faults of the whole run (loading, the first steps and saving "
             "included); medians over rounds.", "",
             "| setting | s/step | user CPU s | system CPU s | minor faults |",
             "|---|---:|---:|---:|---:|"]
    for name, what in (("kept", "freed blocks kept on the heap (default)"),
                       ("off", "glibc's thresholds (`FXQUANT_KEEP_HEAP=0`)")):
        med = {f: statistics.median(run[f] for run in runs[name]) for f in FIELDS}
        lines.append(f"| {what} | {med['step_s']:.3f} | {med['user_s']:.1f} | "
                     f"{med['sys_s']:.1f} | {med['minflt']:,.0f} |")
    lines += ["", f"Off / kept per step: {statistics.median(ratios):.2f}× "
              f"({min(ratios):.2f}–{max(ratios):.2f} over rounds)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiled", required=True, help="saved compiled model (fxquant compile --out)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--write", help="replace this script's section of a Markdown file "
                        "(e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    from fxquant.markdown import tool_command, write_section

    if args.rounds < 1 or args.warmup < 0 or args.steps < args.warmup + 3:
        print("train_heap: error: --rounds must be >= 1 and --steps at least --warmup + 3 "
              "(two step times to take a median of)", file=sys.stderr)
        return 2
    if not Path(args.compiled).is_file():
        print(f"train_heap: error: --compiled {args.compiled}: no such file (a model saved by "
              "fxquant compile --out)", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name in SETTINGS:
                started = time.perf_counter()
                try:
                    runs[name].append(one_run(args.compiled, name, args, Path(scratch) / f"{name}{round_}"))
                except RuntimeError as exc:
                    print(f"train_heap: error: {exc}", file=sys.stderr)
                    return 2
                print(f"round {round_} {name}: {runs[name][-1]} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    text = render(runs, args, tool_command("train_heap.py", argv))
    print(text, end="")
    if args.write:
        write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
