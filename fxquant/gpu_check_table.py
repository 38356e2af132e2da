"""The Markdown of a ``tools/gpu_check.py`` result (its JSON, as run or as saved): the bench
table, the tile sweep, the layer and Set5 agreement, the upscale comparison and the model
checks, with every failed stage named."""

from __future__ import annotations

STAGES = ("layers", "tiles", "models", "set5", "upscale", "bench", "profile")


def failed(stage) -> bool:
    """A stage that raised: its entry is ``{"error": ..., "traceback": ...}``."""
    return isinstance(stage, dict) and "error" in stage


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device_name']} (torch {result['torch']}, triton "
             f"{result.get('triton')}; `python tools/gpu_check.py`, {result.get('seconds')} s)", ""]
    for stage in STAGES:
        if failed(result.get(stage)):
            lines += [f"**Stage {stage} failed**: {result[stage]['error']}", ""]
    if isinstance(result.get("bench"), list):
        lines += ["| model | input | variant | median ms | × fp32 eager |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {'×'.join(map(str, r['input']))} | {r['variant']}"
                  + ("" if r.get("graph_equals_eager", True) else " (output ≠ eager's)") + " | "
                  + (f"{r['median_ms']} | {r['speedup_vs_fp32']} |" if r["median_ms"] is not None
                     else f"failed: {' '.join(r['error'].split())} | |")  # one table row
                  for r in result["bench"]]
        lines.append("")
    if isinstance(result.get("tiles"), list):
        side = "8×8" if result.get("smoke") else "180×320"
        lines += [f"One 64→64 3×3 conv on a 1×64×{side} input (uint8 codes in, float out):", "",
                  "| variant | median ms | × cuDNN fp32 | bit-exact |", "|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['median_ms']} | {r['speedup_vs_fp32']} | "
                  f"{'' if r['bit_exact'] is None else r['bit_exact']} |" for r in result["tiles"]]
        lines.append("")
    if isinstance(result.get("layers"), list):
        layers = result["layers"]
        exact = sum(r["bit_exact"] for r in layers)
        lines += [f"Triton conv vs reference: {exact}/{len(layers)} random layer/epilogue cases "
                  f"bit-exact; largest difference {max(r['max_abs_diff'] for r in layers):.3g}.",
                  ""]
    if isinstance(result.get("set5"), list):
        one = any("gpu_1plane" in r for r in result["set5"])  # (runs after 3c02a99)
        lines += ["IMDN ×4, Set5 PSNR-Y (dB), each recipe calibrated as its preset says:", "",
                  "| recipe | fake-quant | reference (CPU) | gpu | gpu − reference |"
                  + (" gpu, 1 weight plane | 1 plane − fake-quant |" if one else ""),
                  "|---|---|---|---|---|" + ("---|---|" if one else "")]
        lines += [f"| {r['recipe']} | {r['fake-quant']:.4f} | {r['reference']:.4f} | "
                  f"{r['gpu']:.4f} | {r['gpu'] - r['reference']:+.4f} |"
                  + ((f" {r['gpu_1plane']:.4f} | {r['gpu_1plane'] - r['fake-quant']:+.4f} |"
                      if "gpu_1plane" in r else " | |") if one else "")
                  for r in result["set5"]]
        lines.append("")
    if isinstance(result.get("upscale"), dict) and "max_grey_level_diff" in result["upscale"]:
        u = result["upscale"]
        lines += [f"`fxquant upscale --lower gpu` against `--lower reference` ({u['image']}, "
                  f"{u['model']} {u['recipe']}): largest difference {u['max_grey_level_diff']} "
                  f"grey levels, {100 * u['differing']:.3f} % of values differ.", ""]
    profile = result.get("profile")
    if isinstance(profile, dict) and "ops" in profile:
        lines += [f"{profile['model']} ×4 daq-w4a4 lowered to gpu (two planes, eager) on "
                  f"{'×'.join(map(str, profile['input']))}, torch.profiler over "
                  f"{profile['calls']} calls, per call, the ops with the most self time on the "
                  f"{profile.get('clock', 'device')}:", "",
                  "| op | calls | self ms | total CPU ms |", "|---|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['calls_per_run']:g} | {r['self_ms_per_run']:.3f} | "
                  f"{r['cpu_ms_per_run']:.3f} |" for r in profile["ops"]]
        lines.append("")
    if isinstance(result.get("models"), list):
        lines += ["| model | recipe | gpu vs reference PSNR | bit-exact | largest difference | "
                  "SQNR vs FP dB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['recipe']} | {r['gpu_vs_reference_psnr']:.2f} | "
                  f"{r['bit_exact']} | {r['max_abs_diff']:.3g} | {r['sqnr_vs_fp_db']:.2f} |"
                  for r in result["models"]]
    return "\n".join(lines) + "\n"
