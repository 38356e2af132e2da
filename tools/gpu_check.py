"""Every GPU check in one run, for a session lent a GPU (budget: under 8 minutes on an H100/H200):

In order (the stages of the output):

1. ``layers``: the ``gpu`` target's Triton int8 conv against the ``reference`` target on
   random layers, plain and with every fused epilogue (residual, ReLU, requantization to the
   next quantizer's uint8 codes); bit-exact expected (the kernel is launched without fused
   multiply-adds), the largest difference and the fraction of differing outputs reported;
2. ``tiles``: the conv's tile sizes on one SR-typical layer (64→64 3×3 on a 320×180 image),
   timed against cuDNN's fp32 and fp16 conv of the same layer;
3. ``models``: IMDN ×4 (pretrained, when the data root has it) lowered to ``gpu`` against
   ``reference`` (on the CPU) on one random input, for W8A8 (``mse-w8a8-sym``) and the
   dynamic quantizers ``daq-w4a4`` and ``dfsq-w4a4`` (per-(image, channel) scales folded
   into per-image weights);
4. ``set5``: the same three on Set5, each calibrated as its preset says (needs Set5, T91 and
   General100 under the data root): PSNR of the fake-quant, ``reference`` and ``gpu`` models
   (and daq-w4a4's ``gpu`` with one folded-weight plane);
5. ``upscale``: ``fxquant upscale --lower gpu`` against ``--lower reference`` on one Set5
   image (the command line's CUDA path end to end);
6. ``bench``: interleaved rounds, medians, CUDA-synchronized: fp32 eager, bf16 autocast, fp16
   eager (cuDNN; NCHW and channels-last), fp32 ``torch.compile``, and the Triton int8
   lowerings (mse-w8a8-sym fused, with the default tile and the sweep's fastest, and with
   the 1×1 convs as ``torch._int_mm`` GEMMs; daq-w4a4 with two and one folded-weight
   planes, dfsq-w4a4 with two planes and with one and one-byte codes), each also replayed
   as a CUDA graph, for EDSR-baseline ×4 at a 320×180 LR input (720p out) and IMDN ×4 at
   128×128;
7. ``profile``: IMDN's lowered daq-w4a4, eager, under torch.profiler: the ops taking the
   most device time per call.

Each stage runs on its own: one that fails records its error and traceback in the output
and the others still run; the JSON is rewritten after every stage, so a run cut short keeps
what it measured.

    python tools/gpu_check.py --out gpu_check.json [--md gpu_check.md] [--rounds 20]
    TRITON_INTERPRET=1 python tools/gpu_check.py --device cpu --smoke   # the script itself, on CPU
    python tools/gpu_check.py --render gpu_check.json   # a saved result's Markdown again

``--smoke`` shrinks everything (tiny layers, 16×16 inputs, 2 rounds, no Set5 or upscale
stage) so the script can be checked without a GPU; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback

import torch

import fxquant
from fxquant.analysis import psnr_db
from fxquant.files import atomic_write_text, check_output_path
from fxquant.gpu_check_table import STAGES, failed, markdown
from fxquant.gpu_timing import graphed, op_profile, time_variants, with_constants
from fxquant.lower import int_mm, triton_conv
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.triton_conv import GpuConv2d
from fxquant.lower.uniform_codes import IntegerQuantize, quantize_codes
from fxquant.metrics import sqnr_db

LAYERS = [(64, 64, 3, 1), (3, 64, 3, 1), (64, 48, 3, 1), (40, 40, 3, 4), (64, 64, 1, 1),
          (57, 33, 3, 1)]  # (C_in, C_out, kernel, groups): SR-typical, head/tail, odd counts
TILES = [(32, 32, 32), (64, 64, 32), (128, 64, 32), (64, 64, 64), (128, 64, 64),
         (128, 32, 32), (64, 32, 64)]  # (BLOCK_M, BLOCK_N, BLOCK_K) tried by the sweep
DYNAMIC = ("daq-w4a4", "dfsq-w4a4")  # recipes whose per-(n, c) scales the gpu target folds


def random_layer(cin: int, cout: int, k: int, groups: int, device: str):
    """(reference conv, gpu conv) with the same random int8 weights, scales and bias."""
    args = (cin, cout, (k, k), (1, 1), (k // 2, k // 2), (1, 1), groups, True, 8)
    ref = ReferenceConv2d(*args)
    with torch.no_grad():
        ref.weight_codes.copy_(torch.randint(-128, 128, ref.weight_codes.shape, dtype=torch.int8))
        ref.weight_scale.copy_(torch.rand(cout) * 0.01 + 1e-3)
        ref.bias.copy_(torch.randn(cout))
        ref.input_scale.fill_(0.02)
        ref.input_zero_point.fill_(int(torch.randint(0, 256, ())))
    gpu = GpuConv2d(*args)
    gpu.load_state_dict(ref.state_dict(), strict=False)
    return ref.to(device), gpu.to(device)


def check_layers(device: str, smoke: bool) -> list[dict]:
    """Each layer plain, with ReLU, with a residual, with both (the fused epilogue: the
    residual is added before the ReLU), each with float output and with the next quantizer's
    uint8 codes fused in, against the reference conv followed by those ops."""
    rows = []
    size = (1, 8, 8) if smoke else (2, 64, 64)
    for cin, cout, k, groups in LAYERS[:2] if smoke else LAYERS:
        ref, gpu = random_layer(cin, cout, k, groups, device)
        q = torch.randint(0, 256, (size[0], cin) + size[1:], dtype=torch.uint8,
                          device=device).contiguous(memory_format=torch.channels_last)
        r = torch.randn(size[0], cout, *size[1:], device=device)
        for relu in (False, True):
            for residual in (None, r):
                for requantize in (False, True):
                    quantize = IntegerQuantize(8, channels_last=True)
                    quantize.scale.fill_(0.037)
                    quantize.zero_point.fill_(0 if relu else 90)
                    with torch.inference_mode():
                        a = ref(q) if residual is None else ref(q) + residual
                        a = torch.relu(a) if relu else a
                        if requantize:
                            a = quantize_codes(a, quantize.scale.to(device),
                                               quantize.zero_point.to(device), 255)
                    with torch.no_grad():
                        gpu.output_scale.fill_(0.0)  # float output unless fused below
                        gpu.output_relu.fill_(relu)
                        gpu.prepare()
                        if requantize:
                            gpu.fuse_output(quantize, relu)
                    with torch.inference_mode():
                        b = gpu(q, residual)
                    diff = (a.float() - b.float()).abs()
                    epilogue = ["conv"] + ["residual"] * (residual is not None) \
                        + ["relu"] * relu + ["requantize"] * requantize
                    rows.append({"layer": f"{cin}->{cout} k{k} g{groups}",
                                 "epilogue": "+".join(epilogue),
                                 "bit_exact": a.dtype == b.dtype and bool(torch.equal(a, b)),
                                 "max_abs_diff": float(diff.max()),
                                 "differing": float((diff > 0).float().mean())})
    return rows


def check_set5(device: str, smoke: bool, target: str = "gpu") -> list[dict]:
    """IMDN ×4 on Set5 (PSNR-Y as in fxquant eval), each recipe calibrated as its preset
    says: the fake-quant model and the reference target on the CPU, ``target`` on
    ``device``. Needs Set5, T91 and General100 under the data root."""
    from fxquant.workflow import as_sr_function, evaluate_sets, prepare

    rows = []
    for recipe in ("mse-w8a8-sym",) + DYNAMIC:
        zoo = prepare("imdn", 4, recipe)
        fake = zoo.quant_model
        lowered = fxquant.lowered_copy(fake, target).to(device)
        on_target = as_sr_function(lowered, zoo.spec, 4)
        runners = {"fake-quant": as_sr_function(fake, zoo.spec, 4),
                   "reference": as_sr_function(fxquant.lowered_copy(fake, "reference"),
                                               zoo.spec, 4),
                   target: lambda x, f=on_target: f(x.to(device)).cpu()}
        if recipe == "daq-w4a4":  # its folded weights as one int8 plane (balanced codes)
            one = as_sr_function(fxquant.lowered_copy(fake, target, planes=1).to(device),
                                 zoo.spec, 4)
            runners[f"{target}_1plane"] = lambda x, f=one: f(x.to(device)).cpu()
        row = {"model": "imdn", "scale": 4, "recipe": recipe}
        for name, fn in runners.items():
            with torch.inference_mode():
                score = evaluate_sets(fn, zoo.spec, 4, ["Set5"], limit=1 if smoke else None)
            row[name] = round(score["Set5"].psnr, 4)
        rows.append(row)
    return rows


_BUILT: dict = {}


def build(name: str, device: str, smoke: bool, recipe: str = "mse-w8a8-sym", planes: int = 2,
          subset_codes: str = "exact"):
    """(float model, lowered gpu model, lowered reference model, example input), built once
    per (model, recipe, folded-weight planes, DFSQ codes): compiling (calibration) runs on the
    CPU."""
    key = (name, device, smoke, recipe, planes, subset_codes)
    if key in _BUILT:
        return _BUILT[key]
    from fxquant.models import build_model

    try:
        model = build_model(name, 4, pretrained=name == "imdn")
    except fxquant.FxquantError:
        model = build_model(name, 4)  # no weights here: random init, fine for timing
    side = (16, 16) if smoke else (180, 320) if name == "edsr_baseline" else (128, 128)
    generator = torch.Generator().manual_seed(0)
    calib = torch.rand(4 if smoke else 16, 3, 24 if smoke else 48, 24 if smoke else 48,
                       generator=generator)
    fake = fxquant.compile(model, recipe, calib=calib)
    gpu = fxquant.lowered_copy(fake, "gpu", planes=planes, subset_codes=subset_codes).to(device)
    reference = fxquant.lowered_copy(fake, "reference")  # the reference target: CPU only
    x = torch.rand((1, 3) + side, generator=generator).to(device)
    _BUILT[key] = (model.to(device), gpu, reference, x)
    return _BUILT[key]


def check_models(device: str, smoke: bool) -> list[dict]:
    rows = []
    for name in ("imdn",) if not smoke else ("edsr_baseline",):
        for recipe in ("mse-w8a8-sym",) + DYNAMIC:
            model, gpu, reference, x = build(name, device, smoke, recipe)
            with torch.inference_mode():
                fp, a, b = model(x).cpu(), reference(x.cpu()), gpu(x).cpu()
            rows.append({"model": name, "recipe": recipe,
                         "gpu_vs_reference_psnr": psnr_db(a, b),
                         "bit_exact": bool(torch.equal(a, b)),
                         "max_abs_diff": float((a - b).abs().max()),
                         "sqnr_vs_fp_db": sqnr_db(fp, b)})
    return rows


def check_upscale(target: str = "gpu") -> dict:
    """``fxquant upscale --lower gpu`` (on CUDA when there is one) against ``--lower
    reference`` on Set5 'baby' ×4, IMDN compiled with ``mse-w8a8-sym``: the written PNGs'
    largest difference in grey levels and the share of pixels that differ."""
    import tempfile

    import numpy as np
    from PIL import Image

    from fxquant.cli import main as cli
    from fxquant.paths import data_root

    lr = data_root() / "benchmark" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"
    with tempfile.TemporaryDirectory() as tmp:
        saved = f"{tmp}/imdn.fxq"
        if cli(["compile", "--model", "imdn", "--scale", "4", "--recipe", "mse-w8a8-sym",
                "--out", saved]):
            raise RuntimeError("fxquant compile failed (its message is above)")
        images = {}
        for lowered in ("reference", target):
            out = f"{tmp}/{lowered}.png"
            if cli(["upscale", str(lr), "--out", out, "--compiled", saved, "--lower", lowered,
                    "--quiet"]):
                raise RuntimeError(f"fxquant upscale --lower {lowered} failed (message above)")
            images[lowered] = np.asarray(Image.open(out)).astype(np.int16)
    diff = np.abs(images[target] - images["reference"])
    return {"image": "Set5 baby x4", "model": "imdn", "recipe": "mse-w8a8-sym",
            "max_grey_level_diff": int(diff.max()), "differing": float((diff > 0).mean())}


def profile_dynamic(device: str, smoke: bool) -> dict:
    """Where IMDN's lowered daq-w4a4 (two planes, eager) spends its time: the ops by self time
    on the device (the CPU under --smoke), per call, the largest first."""
    name = "edsr_baseline" if smoke else "imdn"
    _, gpu, _, x = build(name, device, smoke, "daq-w4a4")
    calls = 5
    return {"model": name, "input": list(x.shape), "calls": calls,
            "clock": "device" if device == "cuda" else "cpu",
            "ops": op_profile(lambda: gpu(x), device, calls)}


def with_tile(tile: tuple[int, int, int], fn):
    """``fn`` run with the Triton conv's tile set to ``tile``."""
    return with_constants(fn, triton_conv, BLOCK_M=tile[0], BLOCK_N=tile[1], BLOCK_K=tile[2])


def sweep_tiles(device: str, smoke: bool, rounds: int) -> list[dict]:
    """One 64→64 3×3 conv (uint8 codes in, float out, bias): each tile, cuDNN fp16 and fp32."""
    side = (8, 8) if smoke else (180, 320)
    ref, gpu = random_layer(64, 64, 3, 1, device)
    q = torch.randint(0, 256, (1, 64) + side, dtype=torch.uint8, device=device)
    q = q.contiguous(memory_format=torch.channels_last)
    expected = ref(q)
    fns, exact = {}, {}
    for tile in TILES[:2] if smoke else TILES:
        label = "triton_int8_" + "x".join(map(str, tile))
        fns[label] = with_tile(tile, lambda: gpu(q))
        exact[label] = bool(torch.equal(fns[label](), expected))
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(device)
    xf = torch.rand((1, 64) + side, device=device).contiguous(memory_format=torch.channels_last)
    fns["cudnn_fp32"] = lambda: conv(xf)
    if device == "cuda":
        half = copy.deepcopy(conv).half().to(memory_format=torch.channels_last)
        xh = xf.half()
        fns["cudnn_fp16_channels_last"] = lambda: half(xh)
    medians = time_variants(fns, device, rounds, inner=1 if smoke else 20)
    return [{"variant": k, "median_ms": round(v, 4), "bit_exact": exact.get(k),
             "speedup_vs_fp32": round(medians["cudnn_fp32"] / v, 3)} for k, v in medians.items()]


def fastest_tile(sweep) -> tuple[int, int, int] | None:
    if not isinstance(sweep, list):
        return None
    tiles = [r for r in sweep if r["variant"].startswith("triton_int8_") and r["bit_exact"]]
    if not tiles:
        return None
    best = min(tiles, key=lambda r: r["median_ms"])
    return tuple(int(v) for v in best["variant"].rsplit("_", 1)[1].split("x"))


def bench(device: str, smoke: bool, rounds: int, tile) -> list[dict]:
    rows = []
    for name in ("edsr_baseline", "imdn"):
        model, gpu, _, x = build(name, device, smoke)
        fns = {"fp32_eager": lambda: model(x), "triton_int8": lambda: gpu(x)}
        if tile is not None and tuple(tile) != (triton_conv.BLOCK_M, triton_conv.BLOCK_N,
                                                triton_conv.BLOCK_K):
            fns["triton_int8_tile" + "x".join(map(str, tile))] = with_tile(tile, lambda: gpu(x))
        if any(getattr(m, "_gemm", False) for m in gpu.modules()):  # its 1×1 convs' GEMM
            fns["triton_int8_int_mm"] = with_constants(lambda: gpu(x), int_mm, USE_INT_MM=True)
        for recipe in () if smoke else DYNAMIC:  # (the interpreter: checked, not timed)
            fns[f"triton_{recipe}"] = lambda g=build(name, device, smoke, recipe)[1]: g(x)
        if not smoke:  # the fast settings: one int8 plane of the folded weights (DAQ's
            # balanced codes; DFSQ's codes on one byte as well)
            fns["triton_daq-w4a4_1plane"] = \
                lambda g=build(name, device, smoke, "daq-w4a4", planes=1)[1]: g(x)
            fns["triton_dfsq-w4a4_1plane_u8"] = \
                lambda g=build(name, device, smoke, "dfsq-w4a4", 1, "u8")[1]: g(x)
        if device == "cuda":
            half = copy.deepcopy(model).half()
            half_cl = copy.deepcopy(half).to(memory_format=torch.channels_last)
            xh = x.half()
            xh_cl = xh.contiguous(memory_format=torch.channels_last)
            fns.update({"bf16_autocast": lambda: torch.autocast("cuda", torch.bfloat16)(model)(x),
                        "fp16_eager": lambda: half(xh),
                        "fp16_channels_last": lambda: half_cl(xh_cl),
                        "fp32_compiled": lambda c=torch.compile(model): c(x)})
        failed, matches = {}, {}
        if device == "cuda":
            # every graph again as a CUDA graph (DAQ and DFSQ too: their folding runs on the
            # GPU with no host read while captured)
            static = [v for v in fns if not v.startswith(("bf16", "fp32_compiled"))]
            for variant in static:
                try:
                    replay, out = graphed(fns[variant])
                    with torch.inference_mode():
                        replay()
                        matches[variant + "_cudagraph"] = bool(torch.equal(out, fns[variant]()))
                    fns[variant + "_cudagraph"] = replay
                except Exception as error:  # noqa: BLE001  recorded in the table instead
                    failed[variant + "_cudagraph"] = f"{type(error).__name__}: {error}"[:300]
        medians = time_variants(fns, device, rounds)
        base = medians["fp32_eager"]
        for variant, ms in medians.items():
            rows.append({"model": name, "input": list(x.shape), "variant": variant,
                         "median_ms": round(ms, 3), "speedup_vs_fp32": round(base / ms, 3),
                         **({"graph_equals_eager": matches[variant]} if variant in matches
                            else {})})
        rows += [{"model": name, "input": list(x.shape), "variant": variant, "median_ms": None,
                  "speedup_vs_fp32": None, "error": error} for variant, error in failed.items()]
    return rows


def render_saved(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            result = json.load(handle)
    except OSError as error:
        print(f"gpu_check: cannot read {path}: {error.strerror or error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"gpu_check: {path} is not JSON ({error})", file=sys.stderr)
        return 2
    try:
        text = markdown(result)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        print(f"gpu_check: cannot render {path}: it is not a result this script wrote "
              f"({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def run_stage(result: dict, name: str, fn, save) -> None:
    """``result[name] = fn()``, or the error and its traceback when it raises; then save."""
    started = time.perf_counter()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    try:
        result[name] = fn()
    except Exception as error:  # noqa: BLE001  a failed stage must not cost the others
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        result[name] = {"error": f"{type(error).__name__}: {error}", "traceback": trace}
    result["stage_seconds"][name] = round(time.perf_counter() - started, 1)
    save(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: check the script")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--md", help="also write the Markdown table here")
    parser.add_argument("--render", metavar="JSON",
                        help="print the Markdown of a saved result (this script's --out) and "
                             "run nothing")
    args = parser.parse_args(argv)
    if args.render:
        return render_saved(args.render)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu --smoke under "
              "TRITON_INTERPRET=1 to check the script", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        parser.error("--device cpu runs the kernels in the Triton interpreter, hours at full "
                     "size: add --smoke (tiny shapes) or run on a CUDA GPU")
    reason = triton_conv.triton_available()
    if reason is not None:
        print(f"gpu_check: the gpu target cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for path in (args.out, args.md):
        if path:
            check_output_path(path, "gpu check output")
    import triton

    started = time.perf_counter()
    result = {"device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "triton": triton.__version__, "smoke": args.smoke,
              "stage_seconds": {}}

    def save(result: dict) -> None:
        result["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_text(args.out, json.dumps(result, indent=1), "gpu check output")
        if args.md:
            atomic_write_text(args.md, markdown(result), "gpu check output")

    rounds = 2 if args.smoke else args.rounds
    run_stage(result, "layers", lambda: check_layers(args.device, args.smoke), save)
    run_stage(result, "tiles", lambda: sweep_tiles(args.device, args.smoke, rounds), save)
    run_stage(result, "models", lambda: check_models(args.device, args.smoke), save)
    if args.smoke:  # whole Set5 images through the interpreter would take hours
        result["set5"] = result["upscale"] = {"skipped": "--smoke"}
    else:
        run_stage(result, "set5", lambda: check_set5(args.device, args.smoke), save)
        run_stage(result, "upscale", check_upscale, save)
    run_stage(result, "bench", lambda: bench(args.device, args.smoke, rounds,
                                             fastest_tile(result["tiles"])), save)
    run_stage(result, "profile", lambda: profile_dynamic(args.device, args.smoke), save)
    print(markdown(result))
    return 1 if any(failed(result[s]) for s in STAGES) else 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
