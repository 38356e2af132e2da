"""fxquant/gpu_timing.py on the CPU: interleaved rounds, medians, constants restored."""

from __future__ import annotations

import types

import pytest

from fxquant import gpu_timing


def test_variants_are_interleaved_within_each_round_and_warmed_up_first(monkeypatch):
    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: next(clock) / 1e3)
    medians = gpu_timing.time_variants({"a": lambda: calls.append("a"),
                                        "b": lambda: calls.append("b")}, "cpu", rounds=3)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a", "b"] * 3  # warm-up, then a/b per round
    assert medians == {"a": 1.0, "b": 1.0}  # each timed call spans one tick of 1 ms


def test_inner_calls_divide_the_round_time(monkeypatch):
    ticks = iter([0.0, 0.010, 0.010, 0.030])  # two rounds of 10 and 20 ms for 5 calls
    monkeypatch.setattr(gpu_timing.time, "perf_counter", lambda: next(ticks))
    medians = gpu_timing.time_variants({"a": lambda: None}, "cpu", rounds=2, inner=5)
    assert medians == {"a": pytest.approx(3.0)}  # median of 2 and 4 ms per call


def test_constants_are_restored_even_when_the_call_raises():
    module = types.SimpleNamespace(X=1, Y=2)
    assert gpu_timing.with_constants(lambda: (module.X, module.Y), module, X=5)() == (5, 2)

    def fails():
        raise ValueError("no")

    with pytest.raises(ValueError):
        gpu_timing.with_constants(fails, module, X=7, Y=8)()
    assert (module.X, module.Y) == (1, 2)


def test_the_op_profile_counts_calls_per_run_and_sorts_by_self_time():
    import torch

    a = torch.rand(256, 256)

    def fn():  # per call: two matmuls and one add
        return torch.mm(a, a) + torch.mm(a, a)

    rows = gpu_timing.op_profile(fn, "cpu", calls=4, top=50)
    by_op = {r["op"]: r for r in rows}
    assert by_op["aten::mm"]["calls_per_run"] == 2 and by_op["aten::add"]["calls_per_run"] == 1
    times = [r["self_ms_per_run"] for r in rows]
    assert times == sorted(times, reverse=True) and times[0] > 0
    assert len(gpu_timing.op_profile(fn, "cpu", calls=1, top=2)) == 2
