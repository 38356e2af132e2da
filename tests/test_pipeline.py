"""Pass infrastructure: parsing pipelines, running them, verifying and dumping after each pass."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pytest
from torch import fx, nn

from fxquant import PassContext, PassError, PassManager, PassResult, Recipe, RecipeError, parse_pipeline
from fxquant.pipeline import Pass, register_pass


def test_parse_pipeline_with_options():
    passes = parse_pipeline("trace,observe{observer=mse},calibrate{batches=2},quantize{w=8,a=4},verify")
    assert [p.name for p in passes] == ["trace", "observe", "calibrate", "quantize", "verify"]
    assert passes[1].observer == "mse"
    assert passes[2].batches == 2
    assert (passes[3].w, passes[3].a) == (8, 4)
    spec = ",".join(p.spec() for p in passes)
    assert spec == "trace,observe{observer=mse},calibrate{batches=2},quantize{w=8,a=4},verify"
    assert [p.spec() for p in parse_pipeline(spec)] == [p.spec() for p in passes]


@pytest.mark.parametrize("spec, message", [
    ("trace,obsrve", r"unknown pass 'obsrve'.*registered passes:.*observe"),
    ("quantize{bits=4}", r"unknown option 'bits' for pass 'quantize'; valid options: w, a"),
    ("quantize{w=four}", r"quantize.w must be an integer"),
    ("quantize{w=1}", r"quantize.w = 1 is impossible"),
    ("quantize{w}", r"needs key=value"),
    ("quantize{w=4,a=4,w=8}", r"option 'w' of pass 'quantize' is given twice"),
    ("quantize{w=4,a=4,w=4}", r"option 'w' of pass 'quantize' is given twice"),
    ("", r"empty pipeline"),
    ("trace,,verify", r"cannot parse pipeline"),
])
def test_bad_pipelines_are_rejected_clearly(spec, message):
    with pytest.raises(RecipeError, match=message):
        parse_pipeline(spec)


@register_pass
@dataclass(frozen=True)
class _BreakGraph(Pass):
    """Test pass: leaves a call to a submodule that does not exist."""

    name: ClassVar[str] = "test-break-graph"

    def __call__(self, gm, ctx):
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        node.target = "no_such_module"
        return PassResult(gm, True)


@register_pass
@dataclass(frozen=True)
class _Explode(Pass):
    name: ClassVar[str] = "test-explode"

    def __call__(self, gm, ctx):
        raise ZeroDivisionError("boom")


@register_pass
@dataclass(frozen=True)
class _Sleep(Pass):
    name: ClassVar[str] = "test-sleep"

    def __call__(self, gm, ctx):
        time.sleep(0.05)
        return PassResult(gm, False, {})


def test_each_pass_wall_time_is_recorded_beside_its_history(tiny_sr):
    ctx = PassContext(Recipe())
    PassManager("trace,test-sleep,verify").run(tiny_sr, ctx)
    assert [name for name, _ in ctx.history] == ["trace", "test-sleep", "verify"]
    assert len(ctx.seconds) == 3 and all(s >= 0 for s in ctx.seconds)
    assert 0.05 <= ctx.seconds[1] < 5 and ctx.seconds[2] < ctx.seconds[1]


def test_verifier_names_the_failing_pass_and_node(tiny_sr):
    with pytest.raises(PassError) as err:
        PassManager("trace,test-break-graph").run(tiny_sr, PassContext(Recipe()))
    assert err.value.pass_name == "test-break-graph"
    assert err.value.node == "head"
    assert "no_such_module" in str(err.value) and "after: trace" in str(err.value)


def test_unexpected_exceptions_are_wrapped_with_the_pass_name(tiny_sr):
    with pytest.raises(PassError, match=r"pass 'test-explode' failed \(after: trace\): ZeroDivisionError: boom"):
        PassManager("trace,test-explode").run(tiny_sr, PassContext(Recipe()))


def test_trace_is_prepended_for_plain_modules_and_history_is_kept(tiny_sr):
    ctx = PassContext(Recipe())
    gm = PassManager("verify").run(tiny_sr, ctx)
    assert isinstance(gm, fx.GraphModule)
    assert [name for name, _ in ctx.history] == ["trace", "verify"]


def test_dump_after_every_pass(tiny_sr, calib, tmp_path):
    ctx = PassContext(Recipe(), calib=calib)
    PassManager("trace,observe,calibrate,quantize,verify", dump_dir=tmp_path).run(tiny_sr, ctx)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-trace.txt", "01-observe.txt", "02-calibrate.txt", "03-quantize.txt",
                     "04-verify.txt"]
    assert "input_observer" in (tmp_path / "01-observe.txt").read_text()
    assert "input_observer" not in (tmp_path / "03-quantize.txt").read_text()
    assert "uniform bits=8" in (tmp_path / "03-quantize.txt").read_text()


def test_register_pass_requires_frozen_dataclass_with_name():
    with pytest.raises(TypeError, match="frozen dataclass"):
        @register_pass
        class NotDataclass(Pass):
            name: ClassVar[str] = "x"
    with pytest.raises(TypeError, match="no pass name"):
        @register_pass
        @dataclass(frozen=True)
        class NoName(Pass):
            pass


def test_passes_are_frozen():
    p = parse_pipeline("quantize{w=4}")[0]
    with pytest.raises(Exception):
        p.w = 8
    assert isinstance(p, Pass) and not isinstance(p, nn.Module)
