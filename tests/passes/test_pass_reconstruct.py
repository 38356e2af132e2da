"""The ``reconstruct`` pass on a tiny SR network: the distillation loss goes down, the same
seed gives the same parameters, learned steps stay positive (bounds ordered) and finite,
weights end on their grid, the float model is untouched, and a pipeline with nothing to
train is refused by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxquant
from fxquant.errors import PassError
from fxquant.lower.codebook import CodebookQuantize
from fxquant.pipeline import Pass, PassResult, register_pass
from fxquant.quant import QuantConv2d, UniformQuantizer
from fxquant.quant.nonuniform import NonUniformQuantizer

pytestmark = pytest.mark.usefixtures("one_thread")

UNIFORM = "trace,observe,calibrate,quantize,reconstruct{steps=40,eval_every=10,patience=10},verify"


def test_loss_decreases_and_weights_end_on_their_grid(tiny_sr, calib):
    gm = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=UNIFORM)
    info = dict(gm.fxquant_history)["reconstruct{steps=40,eval_every=10,patience=10}"]
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    assert info["features"] == 4 and info["steps"] == 40
    for module in gm.modules():
        if isinstance(module, QuantConv2d):
            assert torch.equal(module.weight_quantizer.fake_quant(module.weight), module.weight)
            assert not hasattr(module, "parametrizations")  # offsets baked and dropped
        if isinstance(module, UniformQuantizer):
            assert torch.isfinite(module.scale).all() and bool((module.scale > 0).all())


def test_quantized_output_gets_closer_to_the_float_model(tiny_sr, calib):
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = tiny_sr(x)
        plain = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib)(x)
        trained = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=UNIFORM)(x)
    assert float((trained - ref).abs().mean()) < float((plain - ref).abs().mean())


def test_same_seed_same_parameters_and_float_model_untouched(tiny_sr, calib):
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    a = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=UNIFORM).state_dict()
    b = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=UNIFORM).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, before[k]) for k, v in tiny_sr.state_dict().items())
    assert all(p.requires_grad for p in tiny_sr.parameters())


def test_nonuniform_levels_train_and_return_to_their_grid(tiny_sr, calib):
    pipeline = ("trace,observe{observer=samples},calibrate,nonuniform-quant,fswa,"
                "reconstruct{steps=30,eval_every=10,patience=10},verify")
    gm = fxquant.compile(tiny_sr, "i2nq-w3a3", calib=calib, pipeline=pipeline)
    q = gm.get_submodule("blocks_0_0_input_quantizer")
    assert isinstance(q, NonUniformQuantizer) and q.integer_grid() is not None
    q.check()  # strictly increasing and on the grid
    assert not q.levels.requires_grad  # a static result again
    lowered = fxquant.lowered_copy(gm, "reference")  # trained levels still lower
    assert any(isinstance(m, CodebookQuantize) for m in lowered.modules())


def test_saved_reconstructed_model_loads_identically(tiny_sr, calib, tmp_path):
    gm = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=UNIFORM)
    fxquant.save(gm, tmp_path / "r.pt")
    loaded = fxquant.load(tmp_path / "r.pt", model=type(tiny_sr)().eval())
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_nothing_to_train_is_refused(tiny_sr, calib):
    with pytest.raises(PassError, match="nothing to train.*no quantizers"):
        fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib,
                        pipeline="trace,reconstruct{steps=5}")
    with pytest.raises(PassError, match="nothing to train"):
        fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib,
                        pipeline="trace,observe,calibrate,quantize,"
                                 "reconstruct{steps=5,ranges=false,rounding=false}")


def test_qdrop_trains_differently_reproducibly_and_leaves_no_hook(tiny_sr, calib):
    drop = UNIFORM.replace("patience=10}", "patience=10,drop=0.5}")
    a = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=drop)
    b = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=drop)
    plain = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=UNIFORM)
    sa, sb, sp = a.state_dict(), b.state_dict(), plain.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sp[k]) for k in sa)
    info = next(i for name, i in a.fxquant_history if name.startswith("reconstruct"))
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    q = a.get_submodule("blocks_0_0_input_quantizer")
    assert not q._forward_hooks
    x = calib[:2]
    with torch.enable_grad():  # no drop left: two calls agree, and equal plain quantization
        torch.testing.assert_close(a(x), a(x), rtol=0, atol=0)
        assert torch.equal(q(x), q.fake_quant(x))


def test_qdrop_probability_must_lie_in_0_1():
    with pytest.raises(fxquant.RecipeError, match=r"reconstruct.drop = 1.0 must lie in \[0, 1\)"):
        fxquant.compile(torch.nn.Conv2d(3, 3, 3), "minmax-w8a8",
                        pipeline="trace,observe,calibrate,quantize,reconstruct{drop=1.0}")


def _count_calls(monkeypatch) -> list:
    """Calls of the student's and the teacher's graph in the reconstruct pass, in that order."""
    import fxquant.passes.reconstruct as module

    calls = []
    real = module.with_outputs

    def counting(gm, names):  # the pass wraps the student, then the teacher: count each's calls
        wrapped = real(gm, names)
        calls.append(0)
        index = len(calls) - 1

        def run(*args):
            calls[index] += 1
            return wrapped(*args)
        return run

    monkeypatch.setattr(module, "with_outputs", counting)
    return calls


@register_pass
@dataclass(frozen=True)
class _ChangeCalibrationOutputs(Pass):
    """Test pass: what calibrate kept no longer equals the float model's outputs (``drop``:
    or is gone)."""
    name: ClassVar[str] = "test-change-calibration-outputs"
    drop: bool = False

    def __call__(self, gm, ctx):
        kept = ctx.state["calibration_outputs"]
        if self.drop:
            kept.clear()
        for index in kept:
            kept[index] = kept[index] + 1
        return PassResult(gm, False, {})


def test_float_targets_come_from_calibrate_after_one_check(tiny_sr, calib, monkeypatch):
    """Without the feature loss the teacher's outputs are computed once per batch and reused
    by every step and held-out evaluation; calibrate's forward of the same batches already
    gave them, so the float model runs once, to check that they are its outputs. With the
    feature loss it runs every step."""
    calls = _count_calls(monkeypatch)
    batches = len(calib) // fxquant.resolve_recipe("minmax-w4a4").calibration.batch_size
    reused = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=UNIFORM).state_dict()
    student, teacher = calls
    assert teacher == 1 and student > 40
    for change, runs in (("drop=True", batches), ("", batches)):  # none kept, or wrong ones
        calls.clear()
        pipeline = UNIFORM.replace("quantize,", f"quantize,test-change-calibration-outputs{{{change}}},")
        computed = fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=pipeline)
        assert calls[1] == runs  # every target computed from the float model ...
        state = computed.state_dict()  # ... and the same result as with calibrate's outputs
        assert all(torch.equal(state[k], reused[k]) for k in reused)
    calls.clear()
    fxquant.compile(tiny_sr, "minmax-w4a4", calib=calib, pipeline=UNIFORM.replace(
        "patience=10}", "patience=10,feature_weight=0.1}"))
    student, teacher = calls
    assert teacher == student


@pytest.mark.parametrize("recipe, head", [
    ("minmax-w4a4", "trace,observe,calibrate,quantize,"),
    ("i2nq-w4a4", "trace,observe{observer=samples},calibrate,nonuniform-quant,fswa,")])
def test_held_out_evaluations_leave_the_training_path_alone(tiny_sr, calib, monkeypatch, recipe,
                                                            head):
    """How often the held-out loss is measured (``eval_every``) changes which step is kept,
    never the steps themselves: with the last step always kept, evaluating after every step
    and only at the end give the same parameters bit for bit (what lets a preset evaluate
    less often to save time without changing a result that is best at its last step)."""
    from fxquant.train.engine import Trainer

    evaluate = Trainer._evaluate

    def keep_last(self, train_loss):
        stop = evaluate(self, train_loss)
        self.best = [p.detach().clone() for p in self.params]
        return stop

    monkeypatch.setattr(Trainer, "_evaluate", keep_last)
    states = []
    for every in (1, 30):
        pipeline = head + f"reconstruct{{steps=30,eval_every={every},patience=100}},verify"
        gm = fxquant.compile(tiny_sr, recipe, calib=calib, pipeline=pipeline)
        info = next(i for spec, i in gm.fxquant_history if spec.startswith("reconstruct"))
        assert len(info["history"]) == 30 // every
        states.append(gm.state_dict())
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BLOCKS = UNIFORM.replace("patience=10}", "patience=10,granularity=block}")


def test_block_wise_trains_each_block_in_turn_reproducibly(tiny_sr, calib):
    """BRECQ's granularity: every block with a quantizer gets its own steps and its own loss
    goes down, and so does the output's; the same seed gives the same parameters; nothing
    more is left trainable than after the end-to-end pass; the float model is untouched."""
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    a = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=BLOCKS)
    b = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=BLOCKS)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    info = next(i for name, i in a.fxquant_history if name.startswith("reconstruct"))
    assert info["granularity"] == "block"
    # the preset keeps the head and tail convs in float: their blocks have nothing to train
    assert [blk["name"] for blk in info["blocks"]] == ["blocks.0", "blocks.1"]
    assert info["steps"] == 2 * 40
    for blk in info["blocks"]:
        assert blk["parameters"] > 0 and blk["loss_after"] < blk["loss_before"]
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    plain = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=UNIFORM)
    grads = lambda gm: {n: p.requires_grad for n, p in gm.named_parameters()}  # noqa: E731
    assert grads(a) == grads(plain)  # left as static as the end-to-end pass leaves them
    assert all(torch.equal(v, before[k]) for k, v in tiny_sr.state_dict().items())
    for module in a.modules():
        if isinstance(module, QuantConv2d):  # rounding learned per block, baked on the grid
            assert torch.equal(module.weight_quantizer.fake_quant(module.weight), module.weight)


def test_block_wise_granularity_is_checked():
    with pytest.raises(fxquant.RecipeError, match="reconstruct.granularity = 'layer': use "
                                                  "'model' or 'block'"):
        fxquant.compile(torch.nn.Conv2d(3, 3, 3), "minmax-w8a8",
                        pipeline="trace,observe,calibrate,quantize,reconstruct{granularity=layer}")


@pytest.mark.parametrize("pipeline", [UNIFORM, BLOCKS,
                                      UNIFORM.replace("patience=10}", "patience=10,drop=0.5}")],
                         ids=["model", "block", "model-qdrop"])
def test_channels_last_training_is_reproducible_and_learns_what_nchw_learns(tiny_sr, calib,
                                                                             pipeline,
                                                                             monkeypatch):
    """``channels_last`` changes only the memory layout: the convs train on channels-last
    inputs, the same seed gives the same parameters, the held-out loss goes down as far as
    the NCHW run's (float rounding apart), and the result is stored in the ordinary layout."""
    layouts = set()
    forward = QuantConv2d.forward

    def recording(self, x):
        if torch.is_grad_enabled():
            layouts.add(x.is_contiguous(memory_format=torch.channels_last))
        return forward(self, x)

    cl = pipeline.replace("patience=10", "patience=10,channels_last=true")
    monkeypatch.setattr(QuantConv2d, "forward", recording)
    a = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=cl)
    monkeypatch.setattr(QuantConv2d, "forward", forward)
    assert layouts == {True}
    b = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=cl)
    nchw = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=pipeline)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(v.is_contiguous() for v in sa.values())
    info = lambda gm: next(i for n, i in gm.fxquant_history if n.startswith("reconstruct"))  # noqa: E731
    ia, ref = info(a), info(nchw)
    assert ia["heldout_loss_before"] == pytest.approx(ref["heldout_loss_before"], rel=1e-5)
    assert ia["heldout_loss_after"] < ia["heldout_loss_before"]
    assert ia["heldout_loss_after"] == pytest.approx(ref["heldout_loss_after"], rel=0.02)


def test_squared_error_loss_is_what_the_pass_trains_with(tiny_sr, calib):
    """``loss=mse``: the held-out loss it reports is the squared error of the untrained start
    (the L1 run starts from the same model, so the two relate as mean d² to mean |d|), it
    trains other parameters than L1, and brings the output's squared error down."""
    mse = UNIFORM.replace("patience=10}", "patience=10,loss=mse}")
    a = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=mse)
    b = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib, pipeline=UNIFORM)
    info_a, info_b = (next(info for key, info in gm.fxquant_history
                           if key.startswith("reconstruct")) for gm in (a, b))
    # same start, |d| < 1 everywhere: (mean |d|)² <= mean d² (Jensen) < mean |d|
    assert info_b["heldout_loss_before"] ** 2 <= info_a["heldout_loss_before"] \
        < info_b["heldout_loss_before"]
    assert info_a["heldout_loss_after"] < info_a["heldout_loss_before"]
    sa, sb = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = tiny_sr(x)
        plain = fxquant.compile(tiny_sr, "minmax-w3a3", calib=calib)(x)
        assert float((a(x) - ref).square().mean()) < float((plain - ref).square().mean())


@pytest.mark.parametrize("options, message", [
    ("loss=l2", "reconstruct.loss = 'l2': use 'l1' or 'mse'"),
    ("loss=mse,granularity=block", "reconstruct.loss applies to granularity = 'model'")])
def test_the_loss_is_checked(options, message):
    with pytest.raises(fxquant.RecipeError, match=message):
        fxquant.compile(torch.nn.Conv2d(3, 3, 3), "minmax-w8a8",
                        pipeline=f"trace,observe,calibrate,quantize,reconstruct{{{options}}}")
