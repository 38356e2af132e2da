"""Plain QAT against ODM v1 and v2 from the same PTQ start (the ODM issue's comparison), on
the CPU with a short schedule or on a GPU with a long one.

    python tools/odm_compare.py --out runs/odm [--models imdn,pan] [--scale 4] [--bits 4,2]
        [--methods qat,odm-v1,odm-v2] [--steps 300] [--batch-size 16] [--patch 48]
        [--lr 1e-4] [--device cpu|cuda] [--eval-sets Set5,Urban100] [--json out.json]
        [--write docs/methods/odm.md]

The common start at ``b`` bits is ``odm-v1-wbab`` without its offsets: per-channel
symmetric weights, MSE-searched per-tensor activation ranges, the same seeded calibration.
``qat`` trains it as it is (method ``uniform``); ``odm-v1`` adds identity offsets where the
mismatch score selects them (its outputs at step 0 equal ``qat``'s) and the cooperative
variance regularizer; ``odm-v2`` replaces the weight quantizers by wcc and adds the
cooperative mismatch regularizer (its 99th-percentile activation ranges are replaced by the
common MSE ranges). Each run is ``fxquant train`` in a subprocess (its recipe TOML is written
to ``<out>/recipes``); the trained ``model.fxq`` is then scored on ``--eval-sets``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fxquant.errors import FxquantError
from fxquant.files import atomic_write_text
from fxquant.markdown import write_section
from fxquant.recipe import Recipe, load_preset

SECTION = "## Same-start comparison: plain QAT, ODM v1, ODM v2"
METHODS = ("qat", "odm-v1", "odm-v2")


def comparison_recipes(bits: int) -> dict[str, Recipe]:
    """The three recipes of one bit-width, sharing one PTQ start."""
    v1 = load_preset(f"odm-v1-w{bits}a{bits}").to_dict()
    v2 = load_preset(f"odm-v2-w{bits}a{bits}").to_dict()
    qat = {**v1, "name": f"qat-w{bits}a{bits}-common", "method": "uniform", "options": {},
           "description": f"plain QAT from the common {bits}-bit start", "pipeline": ""}
    v2 = {**v2, "name": f"odm-v2-w{bits}a{bits}-common", "activations": v1["activations"],
          "description": f"odm-v2-w{bits}a{bits} from the common start (MSE ranges)"}
    v1 = {**v1, "name": f"odm-v1-w{bits}a{bits}-common"}
    return {name: Recipe.from_dict(data) for name, data in
            (("qat", qat), ("odm-v1", v1), ("odm-v2", v2))}


def train(model: str, scale: int, recipe_path: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "fxquant.cli", "train", "--model", model, "--scale",
               str(scale), "--recipe", str(recipe_path), "--out", str(out), "--steps",
               str(args.steps), "--batch-size", str(args.batch_size), "--patch", str(args.patch),
               "--lr", str(args.lr), "--eval-every", str(args.steps), "--log-every", "20",
               "--checkpoint-every", str(args.steps), "--quiet", "--json"]
    if args.device:
        command += ["--device", args.device]
    if args.data:
        command += ["--data", args.data]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise FxquantError(f"fxquant train failed for {model} {recipe_path.name}:\n"
                           + (done.stderr.strip().splitlines() or ["(no output)"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def score(model_file: str, datasets: list[str], data: str | None, limit: int | None) -> dict:
    from fxquant.workflow import evaluate_sets, load_compiled

    models = load_compiled(model_file, data_root=data)
    out = {}
    for which in ("fp", "quant"):
        scores = evaluate_sets(models.runner(which), models.spec, models.scale, datasets,
                               data_root=data, limit=limit)
        out[which] = {ds: round(s.psnr, 3) for ds, s in scores.items()}
    return out


def render(rows: list[dict], command: str, args) -> str:
    sets = args.eval_sets.split(",")
    lines = [SECTION, "", f"`{command}`", "",
             f"{args.steps} steps, batch {args.batch_size}, patch {args.patch}, lr {args.lr} "
             f"(cosine), device {args.device or 'default'}; PSNR dB (Δ from FP). Start: Set5 "
             "PSNR of the compiled model before training.", "",
             "| model | bits | method | start Set5 | " + " | ".join(sets) + " |",
             "|---|---|---|---:|" + "---:|" * len(sets)]
    for r in rows:
        cells = [f"{r['quant'][ds]:.3f} ({r['quant'][ds] - r['fp'][ds]:+.2f})" for ds in sets]
        start = f"{r['start']:.3f}" if r.get("start") is not None else "—"
        lines.append(f"| {r['model']} ×{r['scale']} | W{r['bits']}A{r['bits']} | {r['method']} "
                     f"| {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the runs")
    parser.add_argument("--models", default="imdn,pan")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    parser.add_argument("--eval-sets", default="Set5,Urban100")
    parser.add_argument("--eval-limit", type=int, help="first N images of each set")
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--write", help="replace the section of this Markdown file")
    args = parser.parse_args(argv)
    try:
        methods = args.methods.split(",")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            raise FxquantError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
        out = Path(args.out)
        (out / "recipes").mkdir(parents=True, exist_ok=True)
        rows = []
        for bits in (int(b) for b in args.bits.split(",")):
            recipes = comparison_recipes(bits)
            for model in args.models.split(","):
                for method in methods:
                    path = out / "recipes" / f"{recipes[method].name}.toml"
                    recipes[method].save(path)
                    run = out / f"{model}-x{args.scale}-w{bits}a{bits}-{method}"
                    summary = train(model, args.scale, path, run, args)
                    start = next((e["psnr"] for e in summary["evaluations"] if e["step"] == 0),
                                 None)
                    rows.append({"model": model, "scale": args.scale, "bits": bits,
                                 "method": method, "start": start, "run": str(run),
                                 **score(summary["model"], args.eval_sets.split(","),
                                         args.data, args.eval_limit)})
                    print(json.dumps(rows[-1]), flush=True)
        command = "python tools/odm_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        text = render(rows, command, args)
        if args.json:
            atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n", "comparison results")
        if args.write:
            write_section(args.write, SECTION, text)
        print(text)
    except FxquantError as exc:
        print(f"odm_compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
