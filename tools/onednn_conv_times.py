"""oneDNN's own execution time of every convolution in a lowered model and in PT2E int8.

    python tools/onednn_conv_times.py --model imdn --size 128 --recipe mse-w8a8-sym-all
        [--calls 10] [--scale 4] [--data DIR]

The torch profiler cannot see the convs of ``lower{compile=true}`` (Inductor's C++ wrapper
calls them) and inflates short ops; oneDNN's verbose mode times each primitive execution
itself. Both models run ``--calls`` forwards on the same 1×C×size×size input after warm-up,
interleaved (one forward of each per round: a slow spell of a shared machine hits both);
the table gives, per conv shape, the calls per forward and the median ms per call of each,
and the conv time per forward from those medians. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import re
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict

import torch

SHAPE = re.compile(r"(?:g(\d+))?ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+).*?iw(\d+)ow\d+kw(\d+)")


def conv_times(verbose_text: str) -> dict[str, list[float]]:
    """``{"48→64 3×3 @128×128": [ms of each execution]}`` from oneDNN verbose lines (transposed
    convs as ``"deconv 56→1 9×9 @32×32"``)."""
    times = defaultdict(list)
    for line in verbose_text.splitlines():
        fields = line.strip().split(",")
        kind = next((k for k in ("convolution", "deconvolution") if k in fields), None)
        if not line.startswith("onednn_verbose") or "exec" not in fields[:5] or kind is None:
            continue
        match = SHAPE.search(fields[-2])
        if match is None:
            continue
        groups, ci, co, ih, kh, iw, kw = match.groups()
        key = ("deconv " if kind == "deconvolution" else "") + \
            f"{ci}→{co} {kh}×{kw} @{ih}×{iw}" + (f" g{groups}" if groups else "")
        times[key].append(float(fields[-1]))
    return dict(times)


@contextlib.contextmanager
def c_stdout_to(path: str):
    """Send the C library's stdout (where oneDNN prints) to ``path`` for the block."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def verbose_runs(fns: dict, calls: int) -> dict[str, str]:
    """oneDNN's verbose output of ``calls`` runs of each function (after two warm-up runs),
    interleaved one call of each per round so that a slow spell of the machine hits all."""
    with torch.inference_mode(), tempfile.TemporaryDirectory() as tmp:
        for fn in fns.values():
            fn()
            fn()
        paths = {name: os.path.join(tmp, f"{i}.txt") for i, name in enumerate(fns)}
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            for _ in range(calls):
                for name, fn in fns.items():
                    with c_stdout_to(paths[name]):
                        fn()
        out = {}
        for name, path in paths.items():
            with open(path, encoding="utf-8", errors="replace") as f:
                out[name] = f.read()
        return out


def render(results: dict[str, dict[str, list[float]]], calls: int, title: str) -> str:
    """A Markdown table: per conv shape, calls per forward and median ms per call of each
    variant, then the total conv ms per forward."""
    names = list(results)
    shapes = sorted({s for r in results.values() for s in r},
                    key=lambda s: -max(sum(r.get(s, [])) for r in results.values()))
    lines = [title, "", "| conv | " + " | ".join(f"{n}: calls, ms/call" for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for shape in shapes:
        cells = []
        for name in names:
            t = results[name].get(shape)
            cells.append("—" if not t else f"{len(t) / calls:g}, {statistics.median(t):.3f}")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    # medians, not means: a shared machine's slow spells put outliers into single calls
    lines.append("| **all convs, ms per forward (Σ calls × median)** | " + " | ".join(
        f"**{sum(len(t) / calls * statistics.median(t) for t in results[n].values()):.2f}**"
        for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="imdn")
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--recipe", default="mse-w8a8-sym-all")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--data", help="data root (default: $FXQUANT_DATA)")
    args = parser.parse_args(argv)

    from fxquant.bench import build_all
    from fxquant.errors import FxquantError
    from fxquant.models.user import resolve_model
    from fxquant.recipe import resolve_recipe
    from fxquant.workflow import calibration_data

    try:
        source = resolve_model(args.model, args.scale)
        model = source.build(args.data, pretrained=bool(source.spec.weight_files)).eval()
        recipe = resolve_recipe(args.recipe)
        torch.manual_seed(0)
        x = torch.rand(1, source.spec.channels, args.size, args.size)
        calib = calibration_data(source.spec, args.scale, recipe, args.data)
        concrete = {"scale": args.scale} if source.spec.takes_scale else None
        # the same builders as fxquant bench: the lowered model and PT2E as that table runs them
        variants, missing = build_all(model, x, list(calib.split(1)), calib, recipe, concrete,
                                      ["lowered cpu", "pt2e_int8"])
        for name, why in missing.items():
            print(f"{name} unavailable: {why}", file=sys.stderr)
        fns = {v.name: v.fn for v in variants}
        texts = verbose_runs({name: (lambda f=f: f(x)) for name, f in fns.items()}, args.calls)
        results = {name: conv_times(text) for name, text in texts.items()}
    except FxquantError as exc:
        print(f"onednn_conv_times: error: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "tools/onednn_conv_times.py",
                          *(argv if argv is not None else sys.argv[1:])])
    print(render(results, args.calls,
                 f"`{command}`: {args.model} ×{args.scale}, 1×C×{args.size}×{args.size}, "
                 f"recipe `{args.recipe}`, {args.calls} interleaved forwards, torch threads "
                 f"{torch.get_num_threads()}; oneDNN verbose execution times"))
    return 0


if __name__ == "__main__":
    from fxquant.cli_args import run_tool

    run_tool(main)
