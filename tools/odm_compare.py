"""Plain QAT against ODM v1 and v2 from the same PTQ start (the ODM issue's comparison), on
the CPU with a short schedule or on a GPU with a long one.

    python tools/odm_compare.py --out runs/odm [--models imdn,pan] [--scale 4] [--bits 4,2]
        [--start recon-w4a4] [--methods qat,odm-v1,odm-v2] [--steps 300] [--batch-size 16]
        [--patch 48] [--lr 1e-4] [--teacher-weight 0] [--hr-weight 1] [--quantizer-lr 1]
        [--device cpu|cuda]
        [--eval-sets Set5,Urban100] [--json out.json] [--write docs/methods/odm.md]
        [--render-only] [--section "## heading"]

The start is compiled once per model and saved (``<out>/<model>-x<scale>-<start>.fxq``):
by default, at each of ``--bits``, ``odm-v1-wbab`` without its offsets (per-channel
symmetric weights, MSE-searched per-tensor activation ranges); with ``--start``, any
uniform preset or TOML, e.g. ``recon-w4a4`` (ranges and rounding reconstructed first), or
for ``--methods qat`` alone a start of any method (``i2nq-w4a4-recon``).
``qat`` trains the start as it is; ``odm-v1`` is the start plus ``inject-offsets`` (identity
offsets where the mismatch score selects them: its outputs at step 0 equal ``qat``'s) and
the cooperative variance regularizer; ``odm-v2`` is the start plus ``wcc`` (its weight grids)
and the cooperative mismatch regularizer — the start's activation ranges, not v2's
99th-percentile ones. Each method's model is a ``fxquant.transformed_copy`` of the start
carrying ``method = "odm"`` with the ``[options]`` of the ``odm-vN`` preset of its bits;
each run is ``fxquant train --compiled`` in a subprocess, and the trained ``model.fxq`` is
then scored on ``--eval-sets``. With ``--json`` the rows are written as they come, and a
second call skips the runs already there.
``--teacher-weight``/``--hr-weight`` are ``fxquant train``'s loss weights; a row trained with
other than the HR target alone names its objective after the method (``qat+distil``: the
float model's output the only target; ``qat+teacher``: both), and ``--quantizer-lr`` other
than 1 adds ``+qlr<x>`` (``+qlr0``: the quantizers frozen).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fxquant.data.benchmark import check_sets
from fxquant.errors import FxquantError
from fxquant.files import atomic_write_text, check_output_path
from fxquant.markdown import write_section
from fxquant.recipe import Recipe, load_preset, resolve_recipe
from fxquant.results_store import cell_key, load_store, store_text
from fxquant.train.config import QATConfig

SECTION = "## Same-start comparison: plain QAT, ODM v1, ODM v2"
METHODS = ("qat", "odm-v1", "odm-v2")
EXTRA_PASS = {"odm-v1": "inject-offsets", "odm-v2": "wcc"}
DEFAULT_LR = QATConfig.lr  # fxquant train's --lr default


def common_start(bits: int) -> Recipe:
    """The default start at ``bits``: ``odm-v1-wbab``'s quantization without its offsets."""
    v1 = load_preset(f"odm-v1-w{bits}a{bits}").to_dict()
    return Recipe.from_dict({**v1, "name": f"qat-w{bits}a{bits}-common", "method": "uniform",
                             "options": {}, "pipeline": "",
                             "description": f"plain QAT from the common {bits}-bit start"})


def method_recipe(start: Recipe, method: str) -> Recipe:
    """The recipe a method's copy of ``start`` carries: ``start`` itself for ``qat``; for
    ``odm-vN`` method ``odm`` with the ``odm-vN`` preset's options at the start's bits, and
    a pipeline that is the start's plus the method's pass (what the copy went through)."""
    if method == "qat":
        return start
    bits = start.activations.bits
    preset = load_preset(f"{method}-w{bits}a{bits}")
    return Recipe.from_dict({
        **start.to_dict(), "name": f"{start.name}+{method}", "method": "odm",
        "options": preset.to_dict()["options"],
        "pipeline": f"{start.pipeline_spec},{EXTRA_PASS[method]}",
        "description": f"{start.name} then {EXTRA_PASS[method]}, trained as {method}"})


def read_rows(path: str) -> list[dict]:
    """The rows an earlier run wrote to ``--json`` (none when the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FxquantError(f"--json {path} cannot be read as rows ({exc}); delete it to start "
                           "over, or give another file") from None
    keys = {"model", "scale", "bits", "method", "fp"}
    if not (isinstance(rows, list) and all(isinstance(r, dict) and keys <= r.keys()
                                           for r in rows)):
        raise FxquantError(f"--json {path} is not a list of rows this tool wrote (each with "
                           f"{', '.join(sorted(keys))}); delete it to start over, or give "
                           "another file")
    return rows


def build_start(model: str, scale: int, start: Recipe, methods: list[str], out: Path,
                data: str | None) -> dict:
    """Compile ``start`` once (or reuse its saved file) and save each method's copy; returns
    the compiled file of each method and the start's ``compile_seconds``."""
    import fxquant
    from fxquant.workflow import calibration_data, load_compiled, prepare

    stem = f"{model}-x{scale}-{start.name}"
    start_file, timing = out / f"{stem}.fxq", out / f"{stem}.json"
    if start_file.exists():
        models = load_compiled(start_file, data_root=data)
    else:
        started = time.perf_counter()
        models = prepare(model, scale, start, data_root=data)
        seconds = round(time.perf_counter() - started, 1)
        fxquant.save(models.quant_model, start_file, model_name=model, scale=scale)
        atomic_write_text(timing, json.dumps({"compile_seconds": seconds}) + "\n", "start timing")
    files = {"compile_seconds": json.loads(timing.read_text())["compile_seconds"]
             if timing.exists() else None}
    for method in methods:
        if method == "qat":
            files[method] = start_file
            continue
        calib = calibration_data(models.spec, scale, start, data)
        copy = fxquant.transformed_copy(models.quant_model, EXTRA_PASS[method], calib=calib,
                                        recipe=method_recipe(start, method))
        files[method] = out / f"{stem}-{method}.fxq"
        fxquant.save(copy, files[method], model_name=model, scale=scale)
    return files


def train(compiled: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "fxquant.cli", "train", "--compiled", str(compiled),
               "--out", str(out), "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--patch", str(args.patch),
               "--lr", str(args.lr), "--teacher-weight", str(args.teacher_weight),
               "--hr-weight", str(args.hr_weight), "--quantizer-lr", str(args.quantizer_lr),
               "--eval-every", str(args.steps),
               "--log-every", "20",
               "--checkpoint-every", str(args.steps), "--quiet", "--json"]
    if args.device:
        command += ["--device", args.device]
    if args.channels_last:
        command += ["--channels-last"]
    if args.data:
        command += ["--data", args.data]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise FxquantError(f"fxquant train failed for {compiled.name}:\n"
                           + (done.stderr.strip().splitlines() or ["(no output)"])[-1])
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    # the whole training subprocess, as a user waits for it
    summary["seconds"] = round(time.perf_counter() - started, 1)
    return summary


def score(model_file: str, datasets: list[str], data: str | None, limit: int | None,
          fp_cache: dict) -> dict:
    """PSNR of the trained model and of its float model on ``datasets``; the float scores are
    computed once per (model, scale) and kept in ``fp_cache``."""
    from fxquant.workflow import evaluate_sets, load_compiled

    models = load_compiled(model_file, data_root=data)
    key = (models.spec.name, models.scale)
    runs = [("quant", models.runner("quant"))] + \
        ([] if key in fp_cache else [("fp", models.runner("fp"))])
    out = {}
    for which, runner in runs:
        scores = evaluate_sets(runner, models.spec, models.scale, datasets, data_root=data,
                               limit=limit)
        out[which] = {ds: round(s.psnr, 3) for ds, s in scores.items()}
        out[which + "_ssim"] = {ds: round(s.ssim, 4) for ds, s in scores.items()}
    fp_cache.setdefault(key, out.get("fp"))
    return {"fp": fp_cache[key], "quant": out["quant"], "quant_ssim": out["quant_ssim"]}


def store_cells(rows: list[dict], limit: int | None, command: str) -> dict:
    """The rows as results-store cells (``make results`` renders every store in
    docs/results/ into docs/results.md): recipe ``<method>@<start>``, one cell per set; SSIM
    None for rows scored before it was recorded; each cell names the command that trained its
    row (``command`` for rows written before rows kept theirs)."""
    cells = {}
    for r in rows:
        recipe = f"{method_of(r)}@{start_of(r)}"
        for ds, psnr in r["quant"].items():
            cells[cell_key(r["model"], r["scale"], recipe, ds, limit)] = {
                "model": r["model"], "scale": r["scale"], "recipe": recipe, "dataset": ds,
                "limit": limit, "psnr": psnr, "ssim": r.get("quant_ssim", {}).get(ds),
                "compile_s": round(r.get("start_seconds") or 0, 1),
                "train_s": r.get("seconds"), "command": r.get("command", command)}
    return cells


def replaced_cells(stored: dict, new: dict) -> list[str]:
    """Keys of ``new`` whose stored cell another command trained: the store keys a run by
    model, method and start, not by its schedule, so a run with other steps replaces it."""
    return [key for key, cell in new.items()
            if key in stored and stored[key].get("command") != cell["command"]]


def render(rows: list[dict], command: str, args) -> str:
    sets = args.eval_sets.split(",")
    lines = [args.section, "", f"`{command}`", "",
             f"{args.steps} steps, batch {args.batch_size}, patch {args.patch}, lr {args.lr} "
             f"(cosine), device {args.device or 'default'}; PSNR dB (Δ from FP). Start: the "
             "PTQ start's recipe, its compile minutes and its Set5 PSNR before training; "
             "minutes: the training run, wall clock.", "",
             "| model | bits | start | method | start Set5 | " + " | ".join(sets)
             + " | minutes |", "|---|---|---|---|---:|" + "---:|" * len(sets) + "---:|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["scale"], -r["bits"], start_of(r),
                                         METHODS.index(r["method"]))):
        cells = [f"{r['quant'][ds]:.3f} ({r['quant'][ds] - r['fp'][ds]:+.2f})" for ds in sets]
        psnr = f"{r['start']:.3f}" if r.get("start") is not None else "—"
        built = f" ({r['start_seconds'] / 60:.1f} min)" if r.get("start_seconds") else ""
        minutes = f"{r['seconds'] / 60:.1f}" if r.get("seconds") else "—"
        if r.get("layout") == "channels-last":  # speed and float rounding, not the schedule
            minutes += " (channels-last)"
        lines.append(f"| {r['model']} ×{r['scale']} | W{r['bits']}A{r['bits']} | "
                     f"`{start_of(r)}`{built} | {method_of(r)} | {psnr} | " + " | ".join(cells)
                     + f" | {minutes} |")
    return "\n".join(lines) + "\n"


def objective(hr_weight: float, teacher_weight: float, quantizer_lr: float = 1.0,
              lr: float = DEFAULT_LR) -> str:
    """The suffix that names a training objective other than the HR target alone, a
    quantizer learning-rate multiplier other than 1 and a learning rate other than the
    default (so a run at another rate gets its own row and store cell)."""
    qlr = ("" if quantizer_lr == 1 else f"+qlr{quantizer_lr:g}") + \
        ("" if lr == DEFAULT_LR else f"+lr{lr:g}")
    if not teacher_weight:
        return ("" if hr_weight == 1 else f"+hr{hr_weight:g}") + qlr
    return ("+distil" if not hr_weight else "+teacher") + qlr


def method_of(row: dict) -> str:
    """A row's method with its objective (rows written before objectives were recorded
    trained on the HR target alone)."""
    return row["method"] + row.get("objective", "")


def start_of(row: dict) -> str:
    """The start recipe of a row (rows written before starts were named used the common one)."""
    return row.get("start_recipe") or f"qat-w{row['bits']}a{row['bits']}-common"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the runs")
    parser.add_argument("--models", default="imdn,pan")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--bits", default="4,2", help="bit-widths of the default start")
    parser.add_argument("--start", help="a preset or TOML as the PTQ start instead (its "
                        "bits; --bits is then not used): uniform for the ODM methods, any "
                        "method for plain qat")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--teacher-weight", type=float, default=0.0,
                        help="fxquant train --teacher-weight: L1 to the float model's output")
    parser.add_argument("--hr-weight", type=float, default=1.0,
                        help="fxquant train --hr-weight (0 with --teacher-weight: distillation)")
    parser.add_argument("--quantizer-lr", type=float, default=1.0,
                        help="fxquant train --quantizer-lr (0: the quantizers stay frozen)")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--channels-last", action="store_true",
                        help="train on channels-last patches (fxquant train --channels-last)")
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--eval-sets", default="Set5,Urban100")
    parser.add_argument("--eval-limit", type=int, help="first N images of each set")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--write", help="replace the section of this Markdown file")
    parser.add_argument("--render-only", action="store_true",
                        help="train nothing: render the rows of --json (e.g. trained on a GPU "
                             "elsewhere) with this command's schedule arguments")
    parser.add_argument("--section", default=SECTION,
                        help="the Markdown heading of the section (--write replaces it)")
    parser.add_argument("--store", help="also write the rows as cells of this results store "
                        "(docs/results/odm.json: make results renders it into docs/results.md)")
    args = parser.parse_args(argv)
    try:
        methods = args.methods.split(",")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise FxquantError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.start:
            starts = [resolve_recipe(args.start)]
            odm = [m for m in methods if m != "qat"]
            if starts[0].method != "uniform" and odm:
                raise FxquantError(f"--start {args.start}: method '{starts[0].method}' is not "
                                   f"a uniform PTQ start, which {', '.join(odm)} build on; give "
                                   "a uniform preset or TOML, or --methods qat (plain QAT "
                                   "trains any start)")
        else:
            starts = [common_start(int(b)) for b in args.bits.split(",")]
        # scored after an hour of compile and training: a misspelt set fails now instead
        check_sets("benchmark", args.eval_sets.split(","), args.data)
        # the outputs are written after an hour of training: unwritable paths, or a store
        # that would not load, fail now
        for path, what in ((args.json, "rows (--json)"), (args.store, "results store (--store)"),
                           (args.write, "Markdown file (--write)")):
            if path:
                check_output_path(path, what)
        if args.store:
            load_store(args.store)
        # with --json, rows already there (an earlier, maybe interrupted, run) are kept and
        # their runs skipped; each new row is written as soon as it is scored
        rows = read_rows(args.json) if args.json else []
        if args.render_only and not rows:
            raise FxquantError("--render-only renders the rows of --json: give a --json file "
                               "that has rows")
        suffix = objective(args.hr_weight, args.teacher_weight, args.quantizer_lr, args.lr)
        done = {(r["model"], r["scale"], start_of(r), method_of(r)) for r in rows}
        command = "python tools/odm_compare.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        fp_cache = {(r["model"], r["scale"]): r["fp"] for r in rows}
        for start in [] if args.render_only else starts:
            bits = start.activations.bits
            for model in args.models.split(","):
                todo = [m for m in methods
                        if (model, args.scale, start.name, m + suffix) not in done]
                if not todo:
                    continue
                files = build_start(model, args.scale, start, todo, out, args.data)
                for method in todo:
                    run = out / f"{model}-x{args.scale}-{start.name}-{method}{suffix}"
                    summary = train(files[method], run, args)
                    psnr = next((e["psnr"] for e in summary["evaluations"] if e["step"] == 0),
                                None)
                    rows.append({"model": model, "scale": args.scale, "bits": bits,
                                 "method": method, "objective": suffix,
                                 "start_recipe": start.name, "start": psnr,
                                 "start_seconds": files["compile_seconds"], "run": str(run),
                                 "seconds": summary["seconds"], "command": command,
                                 "layout": "channels-last" if args.channels_last else "nchw",
                                 **score(summary["model"], args.eval_sets.split(","),
                                         args.data, args.eval_limit, fp_cache)})
                    if args.json:
                        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n",
                                          "comparison results")
                    print(json.dumps(rows[-1]), flush=True)
        text = render(rows, command, args)
        if args.store:
            stored = load_store(args.store)
            new = store_cells(rows, args.eval_limit, command)
            for key in replaced_cells(stored, new):
                before = stored[key].get("command")
                print(f"odm_compare: cell {key} replaced; it was trained by "
                      + (f"`{before}`" if before else "a command the store did not record"),
                      file=sys.stderr)
            atomic_write_text(args.store, store_text({**stored, **new}), "results store")
        if args.write:
            write_section(args.write, args.section, text)
        print(text)
    except FxquantError as exc:
        print(f"odm_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
