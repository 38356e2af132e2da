"""Timing on a GPU (or the CPU) for tools/gpu_check.py and anything like it: interleaved,
synchronized medians, CUDA-graph replays, and module constants switched for one call.

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
