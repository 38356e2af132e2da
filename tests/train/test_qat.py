"""QAT (fxquant.train.qat): weights and quantizer steps train together and the loss falls,
the float model is untouched, BatchNorm statistics and other buffers stay fixed, the result
saves/loads (weights_only) and lowers, regularizers plug into the loss, bad settings are
named."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import fxquant
from fxquant.quant import UniformQuantizer
from fxquant.recipe import load_preset
from fxquant.train.config import QATConfig, TrainError
from fxquant.train.distributed import World
from fxquant.train.qat import QATTrainer, StepContext

from qat_helpers import ReconOnly, compiled, config, float_model, sampler

pytestmark = pytest.mark.usefixtures("one_thread")


def scales(gm):
    return {n: m.scale.detach().clone() for n, m in gm.named_modules()
            if isinstance(m, UniformQuantizer)}


def test_weights_and_steps_train_together_and_the_loss_falls(tmp_path):
    model = float_model()
    gm = compiled(model)
    before_scales = scales(gm)
    before_weight = gm.head.weight.detach().clone()
    trainer = QATTrainer(gm, model, config(steps=40, log_every=10, lr=3e-3), sampler=sampler(),
                         scale=2, out_dir=tmp_path / "run")
    trainer.run()
    losses = [r["loss"] for r in trainer.metrics]
    assert [r["step"] for r in trainer.metrics] == [10, 20, 30, 40]
    assert losses[-1] < 0.8 * losses[0]
    after = scales(gm)
    changed = [n for n in after if not torch.equal(after[n], before_scales[n])]
    assert len(changed) == len(after) > 0  # every uniform step moved
    assert not torch.equal(gm.head.weight, before_weight)
    assert all((s > 0).all() for s in after.values())
    logged = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert logged == trainer.metrics
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"last.ckpt", "metrics.jsonl",
                                                              "model.fxq"}


def test_float_model_is_untouched_and_frozen_teacher_is_used():
    model = float_model()
    model.train()  # whatever mode the user left it in is kept
    state = copy.deepcopy(model.state_dict())
    flags = [p.requires_grad for p in model.parameters()]
    gm = compiled(model)
    trainer = QATTrainer(gm, model, config(teacher_weight=0.5), sampler=sampler(), scale=2)
    trainer.run()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(r["teacher"] > 0 for r in trainer.metrics)
    assert all(r["loss"] == pytest.approx(r["recon"] + r["teacher"]) for r in trainer.metrics)
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert not trainer.teacher.training


def test_pure_distillation_leaves_the_hr_target_out():
    """``hr_weight = 0`` with a teacher trains on the float model's output alone: the loss is
    the teacher term, and an HR patch that is pure noise changes nothing."""
    class NoisyHR:
        def __init__(self, inner):
            self.inner = inner

        def sample(self, *args, **kwargs):
            lr, hr = self.inner.sample(*args, **kwargs)
            return lr, torch.rand_like(hr)

    model = float_model()
    runs = []
    for source in (sampler(), NoisyHR(sampler())):
        trainer = QATTrainer(compiled(model), model, config(teacher_weight=1.0, hr_weight=0.0),
                             sampler=source, scale=2)
        trainer.run()
        runs.append(trainer)
    assert all("recon" not in r and r["loss"] == pytest.approx(r["teacher"])
               for r in runs[0].metrics)
    a, b = runs[0].gm.state_dict(), runs[1].gm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_buffers_and_batchnorm_statistics_stay_fixed():
    """The graph trains in eval mode: BatchNorm uses (and keeps) its running statistics and
    no quantizer writes a buffer in fake-quant mode: nothing for DDP to synchronise."""
    model = float_model(bn=True)
    gm = compiled(model)
    buffers = {k: v.clone() for k, v in gm.named_buffers()}
    QATTrainer(gm, model, config(), sampler=sampler(), scale=2).run()
    now = dict(gm.named_buffers())
    # the uniform steps became parameters; every other buffer is still one, bit for bit
    steps = {n + ".scale" for n, m in gm.named_modules() if isinstance(m, UniformQuantizer)}
    assert set(now) == set(buffers) - steps
    assert any("running_mean" in k for k in now) and any("zero_point" in k for k in now)
    assert all(torch.equal(now[k], buffers[k]) for k in now)


def test_trained_model_saves_loads_weights_only_and_lowers(tmp_path):
    model = float_model()
    gm = compiled(model)
    QATTrainer(gm, model, config(), sampler=sampler(), scale=2, out_dir=tmp_path).run()
    loaded = fxquant.load(tmp_path / "model.fxq", model=float_model())  # weights_only inside
    x = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
        lowered = fxquant.lowered_copy(loaded, "reference")(x)
        fake = gm(x)
    step = max(float(m.scale.max()) for m in gm.modules() if isinstance(m, UniformQuantizer))
    assert float((lowered - fake).abs().max()) <= 2 * step
    assert not any(p.requires_grad for m in gm.modules() if isinstance(m, UniformQuantizer)
                   for p in m.parameters())


class ScaleRegularizer:
    """A regularizer with state: λ·Σ steps, counting its calls."""

    name = "scale-sum"

    def __init__(self, weight: float = 0.5):
        self.weight, self.calls, self.seen = weight, 0, []

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        self.calls += 1
        self.seen.append((ctx.step, tuple(ctx.lr.shape), tuple(ctx.hr.shape),
                          tuple(ctx.output.shape), ctx.recon_loss.requires_grad))
        return self.weight * sum(m.scale.sum() for m in ctx.model.modules()
                                 if isinstance(m, UniformQuantizer))

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_regularizers_add_to_the_loss_and_their_state_is_saved(tmp_path):
    model = float_model()
    plain, regular = compiled(model), compiled(model)
    QATTrainer(plain, model, config(), sampler=sampler(), scale=2).run()
    reg = ScaleRegularizer()
    trainer = QATTrainer(regular, model, config(regularizers=[reg]), sampler=sampler(), scale=2)
    trainer.run(until=4)
    assert reg.seen[0] == (0, (4, 3, 8, 8), (4, 3, 16, 16), (4, 3, 16, 16), True)
    assert all(r["loss"] == pytest.approx(r["recon"] + r["scale-sum"]) for r in trainer.metrics)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    again = ScaleRegularizer()
    resumed = QATTrainer.from_checkpoint(tmp_path / "c.ckpt", model, regularizers=[again],
                                         sampler=sampler(), scale=2)
    assert again.calls == 4
    resumed.run()
    # the regularizer pulls the steps down compared with the same run without it
    assert sum(s.sum() for s in scales(resumed.gm).values()) < \
        sum(s.sum() for s in scales(plain).values())
    with pytest.raises(TrainError, match=r"regularizers \['scale-sum'\]; pass the same"):
        QATTrainer.from_checkpoint(tmp_path / "c.ckpt", model, sampler=sampler(), scale=2)


def test_a_backward_hook_sets_the_gradients_itself():
    """A hook that keeps only the reconstruction gradient trains exactly like a run without
    the regularizer; the regularizer's value is still logged, and so is the hook's output."""
    model = float_model()
    plain = QATTrainer(compiled(model), model, config(log_every=1), sampler=sampler(), scale=2)
    plain.run()
    hook = ReconOnly()
    hooked = QATTrainer(compiled(model), model,
                        config(log_every=1, regularizers=[ScaleRegularizer()], backward=hook),
                        sampler=sampler(), scale=2)
    hooked.run()
    a, b = plain.gm.state_dict(), hooked.gm.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["hooked"] for r in hooked.metrics] == [1.0 * i for i in range(1, 9)]
    assert all(r["scale-sum"] > 0 for r in hooked.metrics)
    assert hooked.config.to_dict()["backward"] == "recon-only"


@pytest.mark.parametrize("change, match", [
    ({"steps": 0}, "steps = 0 is invalid; give an integer >= 1"),
    ({"patch": 2}, "patch = 2 is invalid; give an LR patch side >= 3"),
    ({"lr": -1.0}, "lr = -1.0 is invalid; give a positive finite number"),
    ({"schedule": "linear"}, "schedule = 'linear' is invalid; valid: cosine, step, constant"),
    ({"gamma": 2.0}, r"gamma = 2.0 is invalid; give a factor in \(0, 1\]"),
    ({"sets": ()}, "sets = \\(\\) is invalid; name at least one training set"),
    ({"channels_last": "yes"}, "channels_last = 'yes' is invalid; give true or false"),
    ({"hr_weight": 0.0}, "hr_weight = 0.0 is invalid; give hr_weight > 0 or a teacher_weight"),
    ({"hr_weight": -1.0}, "hr_weight = -1.0 is invalid; give a finite number >= 0"),
])
def test_bad_settings_are_named(change, match):
    with pytest.raises(TrainError, match=match):
        config(**change).validate()


def test_refuses_non_compiled_models_shared_parameters_and_uneven_shards():
    model = float_model()
    with pytest.raises(TrainError, match="takes a compiled model"):
        QATTrainer(model, model, config(), sampler=sampler(), scale=2)
    gm = compiled(model)
    with pytest.raises(TrainError, match="shares parameters with the float model"):
        QATTrainer(gm, gm, config(), sampler=sampler(), scale=2)
    with pytest.raises(TrainError, match="--batch-size 4 is not divisible by the 3 ranks"):
        World(0, 3).shard(4)


def test_a_model_with_folded_input_scales_is_refused_and_its_unfolded_twin_trains():
    """fold-input-scales leaves conv weights of ~1/255 their size, which Adam wrecks: the
    trainer names the folded quantizers; the same recipe without the fold trains."""
    model = float_model()
    gm = compiled(model, "minmax-w8a8-perchannel")
    folded = [n for n, m in gm.named_modules() if isinstance(m, UniformQuantizer) and m.folded]
    assert folded
    with pytest.raises(TrainError, match=f"activation quantizer.*{folded[0]}.*folded into the "
                                         "conv weights.*without fold-input-scales"):
        QATTrainer(gm, model, config(), sampler=sampler(), scale=2)
    recipe = load_preset("minmax-w8a8-perchannel")
    unfolded = fxquant.compile(model, dataclasses.replace(
        recipe, pipeline=recipe.pipeline.replace("fold-input-scales,", "")),
        calib=torch.rand(8, 3, 12, 12))
    QATTrainer(unfolded, model, config(), sampler=sampler(), scale=2).run()


def test_diverging_loss_is_named():
    model = float_model()
    gm = compiled(model)
    trainer = QATTrainer(gm, model, config(regularizers=[lambda ctx: ctx.recon_loss / 0.0]),
                         sampler=sampler(), scale=2)
    with pytest.raises(TrainError, match="the loss became inf at step 0.*lower --lr"):
        trainer.run()


def test_step_schedule_multiplies_the_rate():
    model = float_model()
    trainer = QATTrainer(compiled(model), model,
                         config(schedule="step", step_size=2, gamma=0.5, log_every=1,
                                quantizer_lr=10.0), sampler=sampler(), scale=2)
    trainer.run(until=5)
    assert [r["lr"] for r in trainer.metrics] == pytest.approx(
        [2e-3, 1e-3, 1e-3, 5e-4, 5e-4])
    assert trainer.optimizer.param_groups[1]["lr"] == pytest.approx(10 * 5e-4)


def test_train_function_and_tensorboard_when_installed(tmp_path, monkeypatch):
    """``train()`` trains in place and returns the graph; with a SummaryWriter importable
    the logged scalars go to it (faked here: tensorboard is optional)."""
    import sys
    import types

    from fxquant.train.qat import train

    written = []

    class Writer:
        def __init__(self, folder):
            written.append(("folder", folder))

        def add_scalar(self, key, value, step):
            written.append((key, step))

        def flush(self):
            written.append(("flush", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    model = float_model()
    gm = compiled(model)
    before = gm.head.weight.detach().clone()
    out = train(gm, model, config(steps=4, log_every=2), scale=2, sampler=sampler(),
                out_dir=tmp_path, world=World())
    assert out is gm and not torch.equal(gm.head.weight, before)
    assert written[0] == ("folder", str(tmp_path / "tensorboard"))
    assert ("loss", 2) in written and ("recon", 4) in written and written[-1][0] == "flush"


def test_config_round_trips_through_its_dict():
    settings = config(schedule="step", sets=("T91",), eval_limit=3)
    again = QATConfig.from_dict(settings.to_dict())
    assert again.to_dict() == settings.to_dict() and again.sets == ("T91",)
    with pytest.raises(TrainError, match=r"unknown training settings \['bogus'\]"):
        QATConfig.from_dict({**settings.to_dict(), "bogus": 1})


@pytest.mark.parametrize("recipe", ["i2nq-w4a4", "daq-w4a4"])
def test_other_quantizer_kinds_train_and_still_lower(recipe):
    """Non-uniform levels train and return to their grid (as after ``reconstruct``); DAQ
    (no static quantizer parameters) trains its weights alone; both lower afterwards."""
    from fxquant.quant import QuantConv2d
    from fxquant.quant.nonuniform import NonUniformQuantizer

    model = float_model()
    gm = compiled(model, recipe)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    trainer = QATTrainer(gm, model, config(), sampler=sampler(), scale=2)
    trainer.run()
    assert trainer.metrics[-1]["loss"] < trainer.metrics[0]["loss"]
    convs = [n for n, m in gm.named_modules() if isinstance(m, QuantConv2d)]
    assert all(not torch.equal(gm.state_dict()[f"{n}.weight"], before[f"{n}.weight"])
               for n in convs)
    levels = [n for n, m in gm.named_modules() if isinstance(m, NonUniformQuantizer)]
    for n in levels:
        q = gm.get_submodule(n)
        q.check()  # sorted, strictly increasing, on its grid
        assert not q.levels.requires_grad
    assert (recipe == "daq-w4a4") == (not levels)
    assert not levels or any(not torch.equal(gm.state_dict()[f"{n}.levels"],
                                             before[f"{n}.levels"]) for n in levels)
    x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert fxquant.lowered_copy(gm, "reference")(x).shape == (1, 3, 20, 20)


def test_evaluations_score_the_model_as_saved(tmp_path):
    """Trained I²NQ levels drift off their grid until :meth:`finish`; every evaluation scores
    (and ``best.fxq`` holds) the tidied copy that would be saved, and the training graph's
    own levels are left where training put them."""
    from fxquant.quant.nonuniform import NonUniformQuantizer

    model = float_model()
    gm = compiled(model, "i2nq-w4a4")
    trainer = QATTrainer(gm, model, config(lr=2e-2), sampler=sampler(), scale=2,
                         out_dir=tmp_path / "run")
    scored = []
    trainer.evaluate = lambda m: scored.append(m) or {"psnr": float(len(scored))}
    trainer.config.eval_every = 4
    trainer.run(until=4)
    live = [m for m in gm.modules() if isinstance(m, NonUniformQuantizer)]
    saved = [m for m in scored[-1].modules() if isinstance(m, NonUniformQuantizer)]
    assert scored[-1] is not gm and len(saved) == len(live) > 0
    for q in saved:
        q.check()  # on its grid
    assert any(not torch.equal(a.levels, b.levels) for a, b in zip(live, saved))
    best = fxquant.load(tmp_path / "run" / "best.fxq", model=float_model())
    for a, b in zip(saved, [m for m in best.modules() if isinstance(m, NonUniformQuantizer)]):
        assert torch.equal(a.levels, b.levels)


def test_quantizer_lr_zero_trains_the_weights_alone():
    model = float_model()
    gm = compiled(model, "i2nq-w4a4")
    quantizers = {k: v.clone() for k, v in gm.state_dict().items()
                  if k.endswith((".levels", ".scale"))}
    trainer = QATTrainer(gm, model, config(quantizer_lr=0.0), sampler=sampler(), scale=2)
    trainer.run()
    assert quantizers and all(torch.equal(gm.state_dict()[k], v) for k, v in quantizers.items())
    assert not torch.equal(gm.head.weight, compiled(model, "i2nq-w4a4").head.weight)
