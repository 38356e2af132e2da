"""Timing on a GPU (or the CPU) for tools/gpu_check.py and anything like it: interleaved,
synchronized medians, CUDA-graph replays, module constants switched for one call, and an
op-by-op profile.

Ratios measured side by side in one process, variants interleaved within each round, and
medians (the project's benchmarking rule); absolute times only mean something on a GPU.
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_variants(fns: dict, device: str, rounds: int, inner: int = 1) -> dict[str, float]:
    """Median milliseconds per call, ``inner`` calls of each variant per round, variants
    interleaved within each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(3):
                fn()
        sync(device)
        for _ in range(rounds):
            for name, fn in fns.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync(device)
                times[name].append(1e3 * (time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def with_constants(fn, module, **values):
    """``fn`` run with ``module``'s constants set to ``values`` (the gpu target reads them at
    each call), then restored."""
    def call():
        saved = {name: getattr(module, name) for name in values}
        for name, value in values.items():
            setattr(module, name, value)
        try:
            return fn()
        finally:
            for name, value in saved.items():
                setattr(module, name, value)
    return call


def graphed(fn):
    """``fn`` captured once in a CUDA graph: (replay, the output tensor each replay rewrites).
    Replaying runs the same kernels on the same buffers without the Python launch overhead
    of each op: the GPU's own time."""
    with torch.inference_mode():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    return graph.replay, out


def op_profile(fn, device: str, calls: int = 5, top: int = 12) -> list[dict]:
    """torch.profiler's ops for ``calls`` calls of ``fn`` (after one warm-up call), by self
    time on the device (on the CPU when ``device`` is ``cpu``), the ``top`` largest: the op,
    its calls, its self milliseconds and its total CPU milliseconds, each per call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode():
        fn()
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            sync(device)
    clock = "device" if device == "cuda" else "cpu"
    rows = [{"op": e.key[:60], "calls_per_run": round(e.count / calls, 4),
             "self_ms_per_run": round(getattr(e, f"self_{clock}_time_total") / 1e3 / calls, 4),
             "cpu_ms_per_run": round(e.cpu_time_total / 1e3 / calls, 4)}
            for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r["self_ms_per_run"])[:top]
