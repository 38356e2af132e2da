"""``fxquant train``: quantization-aware training of a compiled model from its PTQ start.

    fxquant train --model imdn --scale 4 --recipe mse-w4a4 --steps 2000 --batch-size 16 \\
        --patch 48 --lr 1e-4 --eval-set Set5 --eval-limit 5 --eval-every 500 \\
        --checkpoint-every 500 --out runs/imdn-w4a4/
    fxquant train --compiled imdn-w4a4.fxq --steps 2000 --out runs/x/      # a saved PTQ start
    fxquant train --resume runs/imdn-w4a4/last.ckpt --out runs/imdn-w4a4/  # exact continuation
    torchrun --nproc_per_node 2 -m fxquant.cli train ...                   # DDP, one shard per rank

The run folder gets ``last.ckpt`` (every ``--checkpoint-every`` steps and at the end),
``metrics.jsonl``, ``model.fxq`` (the trained model, for fxquant.load / eval / export) and,
with ``--eval-every``, ``best.fxq`` (best PSNR on ``--eval-set``).
"""

from __future__ import annotations

import argparse
import json

from fxquant.cli_args import non_negative_int, positive_int
from fxquant.errors import FxquantError




def build_parser(p: argparse.ArgumentParser) -> None:
    from fxquant.cli_args import MODEL_HELP, add_own_model_args

    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--scale", type=positive_int, help="upscaling factor (zoo models)")
    p.add_argument("--recipe", help="preset or .toml: compile (PTQ) here, then train")
    p.add_argument("--compiled", help="start from this saved compiled model instead")
    p.add_argument("--resume", help="continue the run saved in this last.ckpt exactly")
    p.add_argument("--checkpoint", help="zoo model weights instead of the pretrained ones")
    add_own_model_args(p)
    p.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    p.add_argument("--out", required=True, help="run folder (created if missing)")
    p.add_argument("--steps", type=positive_int, default=1000)
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="global batch (split over torchrun ranks)")
    p.add_argument("--patch", type=positive_int, default=48, help="LR patch side")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--quantizer-lr", type=float, default=1.0,
                   help="multiplier of --lr for the quantizers' steps/levels (default 1; "
                        "0: the quantizers stay frozen, the weights alone train)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    p.add_argument("--step-size", type=positive_int, default=250,
                   help="--schedule step: multiply the lr by --gamma every this many steps")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--teacher-weight", type=float, default=0.0,
                   help="weight of L1 to the float model's output (0: HR target alone)")
    p.add_argument("--hr-weight", type=float, default=1.0,
                   help="weight of L1 to the HR patch (0 with --teacher-weight: distillation "
                        "from the float model alone)")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    p.add_argument("--sets", default="T91,General100", help="training sets under <data>/train")
    p.add_argument("--no-augment", action="store_true", help="no random flips/rotations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-set", help="benchmark set for --eval-every (default: Set5)")
    p.add_argument("--eval-limit", type=positive_int, help="first N images of --eval-set")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="PSNR on --eval-set every N steps and at the end (0: never)")
    p.add_argument("--checkpoint-every", type=non_negative_int, default=0,
                   help="write last.ckpt every N steps (it is always written at the end)")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--channels-last", action="store_true",
                   help="train on channels-last patches (faster convs on CPU)")
    p.add_argument("--device", choices=("cpu", "cuda"),
                   help="default: cuda when available (one GPU per torchrun rank), else cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _config(args):
    from fxquant.train.config import QATConfig

    if not args.eval_every and (args.eval_set or args.eval_limit):  # would be ignored silently
        given = "--eval-set" if args.eval_set else "--eval-limit"
        raise FxquantError(f"{given} applies to periodic evaluation, which is off: add "
                           "--eval-every N (PSNR every N steps and at the end)")
    sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
    return QATConfig(steps=args.steps, batch_size=args.batch_size, patch=args.patch, lr=args.lr,
                     quantizer_lr=args.quantizer_lr, weight_decay=args.weight_decay,
                     schedule=args.schedule, step_size=args.step_size, gamma=args.gamma,
                     teacher_weight=args.teacher_weight, hr_weight=args.hr_weight,
                     grad_clip=args.grad_clip, sets=sets,
                     augment=not args.no_augment, seed=args.seed, eval_every=args.eval_every,
                     eval_set=args.eval_set or "Set5", eval_limit=args.eval_limit,
                     checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                     channels_last=args.channels_last).validate()


def run(args: argparse.Namespace) -> int:
    from fxquant.data.benchmark import check_sets
    from fxquant.files import check_output_dir
    from fxquant.models.user import own_model_flags, source_from_args, source_from_compiled
    from fxquant.train.checkpoint import read_checkpoint
    from fxquant.train.data import PatchSampler
    from fxquant.train.distributed import setup
    from fxquant.train.qat import QATTrainer
    from fxquant.train.resume import RESUME_MAY_CHANGE
    from fxquant.workflow import load_compiled, prepare

    starts = [flag for flag, v in (("--resume", args.resume), ("--compiled", args.compiled),
                                   ("--recipe", args.recipe)) if v]
    if len(starts) != 1:
        raise FxquantError("give one start: --model/--scale with --recipe (PTQ here), "
                           "--compiled FILE, or --resume run_dir/last.ckpt"
                           + (f" (got {', '.join(starts)})" if starts else ""))
    check_output_dir(args.out, "training output folder (--out)")
    world = setup(args.device)
    try:
        config = _config(args)
        # the sets are read after the start is built, which can take minutes: a misspelt
        # name fails now (a resumed run trains on the sets its checkpoint names)
        if not args.resume:
            check_sets("train", config.sets, args.data)
        if config.eval_every:
            check_sets("benchmark", [config.eval_set], args.data)
        common = {"out_dir": args.out, "data_root": args.data, "world": world,
                  "progress": not args.quiet and world.is_main}
        if args.resume:
            payload = read_checkpoint(args.resume)
            source = source_from_compiled(payload["compiled"]["model"], args.model,
                                          scale=args.scale, path=args.resume,
                                          **own_model_flags(args))
            float_model = source.build(args.data)
            saved = payload["config"]
            sampler = PatchSampler.from_sets(saved["sets"], source.scale, saved["patch"],
                                             root=args.data, color=source.spec.color,
                                             augment=saved["augment"])
            trainer = QATTrainer.from_checkpoint(
                args.resume, float_model, sampler=sampler, scale=source.scale, spec=source.spec,
                changes={k: getattr(config, k) for k in RESUME_MAY_CHANGE}, **common)
        else:
            if args.compiled:
                models = load_compiled(args.compiled, model=args.model, scale=args.scale,
                                       data_root=args.data, **own_model_flags(args))
                info = _info_from_compiled(args.compiled)
            else:
                source = source_from_args(args)
                models = prepare(source, None, args.recipe, data_root=args.data,
                                 progress=common["progress"])
                info = {"model_name": None if source.is_user else args.model,
                        "scale": models.scale, "user_model": source.reference()}
            sampler = PatchSampler.from_sets(config.sets, models.scale, config.patch,
                                             root=args.data, color=models.spec.color,
                                             augment=config.augment)
            trainer = QATTrainer(models.quant_model, models.float_model, config,
                                 sampler=sampler, scale=models.scale, spec=models.spec,
                                 model_info=info, **common)
        trainer.run()
        if world.is_main:
            _summary(trainer, args)
        trainer.release()
    finally:
        world.close()
    return 0


def _info_from_compiled(path: str) -> dict:
    from fxquant.compiler import read_compiled

    info = read_compiled(path)["model"]
    return {"model_name": info.get("name"), "scale": info.get("scale"),
            "user_model": info.get("user")}


def _summary(trainer, args) -> None:
    losses = [r["loss"] for r in trainer.metrics if "loss" in r]
    evals = [r for r in trainer.metrics if "psnr" in r]
    summary = {"out": args.out, "steps": trainer.step, "ranks": trainer.world.size,
               "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None,
               "evaluations": evals, "model": f"{args.out.rstrip('/')}/model.fxq"}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"trained {trainer.step} steps on {trainer.world.size} rank(s); loss "
          f"{summary['first_loss']:.4g} -> {summary['last_loss']:.4g}" if losses else
          f"trained {trainer.step} steps")
    for r in evals:
        print(f"  step {r['step']}: {r['eval_set']} PSNR {r['psnr']:.3f} dB, SSIM {r['ssim']:.4f}")
    print(f"saved {summary['model']} (run folder {args.out})")
