"""Every GPU check in one run, for a session lent a GPU (budget: under 8 minutes on an H100/H200):

1. correctness of the ``gpu`` target's Triton int8 conv against the ``reference`` target on
   random layers (bit-exact expected; a fused multiply-add in the epilogue may cost one float
   ulp, so the largest difference and the fraction of differing outputs are reported);
2. whole models: IMDN ×4 (pretrained, when the data root has it) lowered to ``gpu`` against
   ``reference`` on one input, for W8A8 (``mse-w8a8-sym``) and for the dynamic quantizers
   ``daq-w4a4`` and ``dfsq-w4a4`` (per-(image, channel) scales folded into per-image weights);
3. timing, interleaved rounds, medians, CUDA-synchronized: fp32 eager, bf16 and fp16 eager
   (cuDNN), fp32 ``torch.compile``, and the Triton int8 lowerings (mse-w8a8-sym fused,
   daq-w4a4, dfsq-w4a4), for EDSR-baseline ×4 at a 320×180 LR input (720p out) and IMDN ×4.

    python tools/gpu_check.py --out gpu_check.json [--md gpu_check.md] [--rounds 20]
    TRITON_INTERPRET=1 python tools/gpu_check.py --device cpu --smoke   # the script itself, on CPU

``--smoke`` shrinks everything (tiny layers, 16×16 inputs, 2 rounds) so the script can be
checked without a GPU; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fxquant
from fxquant.files import atomic_write_text, check_output_path
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.triton_conv import GpuConv2d
from fxquant.metrics import sqnr_db

LAYERS = [(64, 64, 3, 1), (3, 64, 3, 1), (64, 48, 3, 1), (40, 40, 3, 4), (64, 64, 1, 1),
          (57, 33, 3, 1)]  # (C_in, C_out, kernel, groups): SR-typical, head/tail, odd counts


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_layers(device: str, smoke: bool) -> list[dict]:
    rows = []
    size = (1, 8, 8) if smoke else (2, 64, 64)
    for cin, cout, k, groups in LAYERS[:2] if smoke else LAYERS:
        args = (cin, cout, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups, True, 8)
        ref = ReferenceConv2d(*args)
        with torch.no_grad():
            ref.weight_codes.copy_(torch.randint(-128, 128, ref.weight_codes.shape,
                                                 dtype=torch.int8))
            ref.weight_scale.copy_(torch.rand(cout) * 0.01 + 1e-3)
            ref.bias.copy_(torch.randn(cout))
            ref.input_scale.fill_(0.02)
            ref.input_zero_point.fill_(int(torch.randint(0, 256, ())))
        gpu = GpuConv2d(*args)
        gpu.load_state_dict(ref.state_dict(), strict=False)
        ref, gpu = ref.to(device), gpu.to(device)
        q = torch.randint(0, 256, (size[0], cin) + size[1:], dtype=torch.uint8, device=device)
        q = q.contiguous(memory_format=torch.channels_last)
        a, b = ref(q), gpu(q)
        diff = (a - b).abs()
        rows.append({"layer": f"{cin}->{cout} k{k} g{groups}", "bit_exact": bool(torch.equal(a, b)),
                     "max_abs_diff": float(diff.max()), "differing": float((diff > 0).float().mean())})
    return rows


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


DYNAMIC = ("daq-w4a4", "dfsq-w4a4")  # recipes whose per-(n, c) scales the gpu target folds


def build(name: str, device: str, smoke: bool, recipe: str = "mse-w8a8-sym"):
    """(float model, lowered gpu model, lowered reference model, example input)."""
    from fxquant.models import build_model

    try:
        model = build_model(name, 4, pretrained=name == "imdn")
    except fxquant.FxquantError:
        model = build_model(name, 4)  # no weights here: random init, fine for timing
    side = (16, 16) if smoke else (180, 320) if name == "edsr_baseline" else (128, 128)
    calib = torch.rand(4 if smoke else 16, 3, 24 if smoke else 48, 24 if smoke else 48)
    fake = fxquant.compile(model, recipe, calib=calib)
    gpu = fxquant.lowered_copy(fake, "gpu").to(device)
    reference = fxquant.lowered_copy(fake, "reference").to(device)
    return model.to(device), gpu, reference, torch.rand((1, 3) + side, device=device)


def check_models(device: str, smoke: bool) -> list[dict]:
    rows = []
    for name in ("imdn",) if not smoke else ("edsr_baseline",):
        for recipe in ("mse-w8a8-sym",) + DYNAMIC:
            model, gpu, reference, x = build(name, device, smoke, recipe)
            with torch.inference_mode():
                fp, a, b = model(x), reference(x), gpu(x)
            rows.append({"model": name, "recipe": recipe, "gpu_vs_reference_psnr": _psnr(a, b),
                         "bit_exact": bool(torch.equal(a, b)), "sqnr_vs_fp_db": sqnr_db(fp, b)})
    return rows


def time_variants(fns: dict, device: str, rounds: int) -> dict[str, float]:
    """Median milliseconds per call, one call of each variant per round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(3):
                fn()
        _sync(device)
        for _ in range(rounds):
            for name, fn in fns.items():
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(1e3 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def bench(device: str, smoke: bool, rounds: int) -> list[dict]:
    rows = []
    for name in ("edsr_baseline", "imdn"):
        model, gpu, _, x = build(name, device, smoke)
        fns = {"fp32_eager": lambda: model(x), "triton_int8": lambda: gpu(x)}
        for recipe in () if smoke else DYNAMIC:  # (the interpreter: checked, not timed)
            fns[f"triton_{recipe}"] = lambda g=build(name, device, smoke, recipe)[1]: g(x)
        if device == "cuda":
            bf16 = lambda: torch.autocast("cuda", torch.bfloat16)(model)(x)  # noqa: E731
            half = __import__("copy").deepcopy(model).half()
            xh = x.half()
            fns.update({"bf16_autocast": bf16, "fp16_eager": lambda: half(xh),
                        "fp32_compiled": lambda c=torch.compile(model): c(x)})
        medians = time_variants(fns, device, rounds)
        base = medians["fp32_eager"]
        for variant, ms in medians.items():
            rows.append({"model": name, "input": list(x.shape), "variant": variant,
                         "median_ms": round(ms, 3), "speedup_vs_fp32": round(base / ms, 3)})
    return rows


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device_name']} (`python tools/gpu_check.py`)", "",
             "| model | input | variant | median ms | × fp32 eager |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {'×'.join(map(str, r['input']))} | {r['variant']} | "
              f"{r['median_ms']} | {r['speedup_vs_fp32']} |" for r in result["bench"]]
    exact = sum(r["bit_exact"] for r in result["layers"])
    lines += ["", f"Triton conv vs reference: {exact}/{len(result['layers'])} random layers "
                  f"bit-exact; largest difference "
                  f"{max(r['max_abs_diff'] for r in result['layers']):.3g}.", "",
              "| model | recipe | gpu vs reference PSNR | bit-exact | SQNR vs FP dB |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['recipe']} | {r['gpu_vs_reference_psnr']:.2f} | "
              f"{r['bit_exact']} | {r['sqnr_vs_fp_db']:.2f} |" for r in result["models"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--md", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --smoke under "
              "TRITON_INTERPRET=1 to check the script", file=sys.stderr)
        return 2
    for path in (args.out, args.md):
        if path:
            check_output_path(path, "gpu check output")
    started = time.perf_counter()
    result = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke}
    result["layers"] = check_layers(args.device, args.smoke)
    result["models"] = check_models(args.device, args.smoke)
    result["bench"] = bench(args.device, args.smoke, 2 if args.smoke else args.rounds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(args.out, json.dumps(result, indent=1), "gpu check output")
    if args.md:
        atomic_write_text(args.md, markdown(result), "gpu check output")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
