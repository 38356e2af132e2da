"""``equalize``: the float function is kept, activation outliers move into the weights, and
per-tensor 8-bit quantization gets back what the outlier channel cost; refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from fxquant import PassContext, PassError, Recipe, compile, load, save
from fxquant.metrics import sqnr_db
from fxquant.passes.equalize import EqualizePass
from fxquant.passes.trace import TracePass
from fxquant.quant.equalization import equalization_scales, input_channel_absmax

pytestmark = pytest.mark.usefixtures("one_thread")

W8A8 = {"method": "uniform", "weights": {"bits": 8}, "activations": {"bits": 8, "observer": "mse"}}


class Chain(nn.Module):
    """FSRCNN's shape in miniature: head conv → PReLU → 1×1 shrink → PReLU → 3×3 (grouped) →
    PReLU → 1×1 expand → tail, the expand output also read by a mean."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.head = nn.Conv2d(1, c, 5, padding=2)
        self.a0 = nn.PReLU(c)
        self.shrink = nn.Conv2d(c, 4, 1)
        self.a1 = nn.PReLU(4)
        self.mid = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.a2 = nn.LeakyReLU(0.1)
        self.expand = nn.Conv2d(4, c, 1)
        self.tail = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        x = self.a0(self.head(x))
        x = self.a2(self.mid(self.a1(self.shrink(x))))
        y = self.expand(x)
        return self.tail(y) + y.mean(1, keepdim=True)  # y also feeds the mean: no tail fold


def chain(outlier: float = 1.0, seed: int = 0) -> Chain:
    """A random chain; ``outlier`` > 1 scales head channel 0 up and shrink's column 0 down by
    the same factor: the same function, one activation channel ``outlier`` times wider."""
    torch.manual_seed(seed)
    model = Chain().eval()
    with torch.no_grad():
        model.head.weight[0] *= outlier
        model.head.bias[0] *= outlier
        model.shrink.weight[:, 0] /= outlier
    return model


def calib_data(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def equalized(model, alpha=0.5, **opts):
    ctx = PassContext(recipe=Recipe.from_dict(W8A8), calib=[(x,) for x in calib_data().split(4)])
    gm = TracePass()(model, ctx).graph_module
    result = EqualizePass(alpha=alpha, **opts)(gm, ctx)
    return result, ctx


def test_float_function_and_user_model_unchanged():
    model = chain(outlier=30.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, ctx = equalized(model)
    x = calib_data(2)
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-5, atol=1e-6)
    assert result.info["pairs"] == 3  # head→shrink, shrink→mid (grouped), mid→expand
    assert result.info["max_rel_error"] < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ctx.state["equalize"]["tail"] == "refused: expand also feeds mean (e.g. a residual add)"


@settings(max_examples=25, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_range_times_weight_is_invariant_and_alpha_one_balances_activations(alpha, seed):
    model = chain(outlier=10.0, seed=seed)
    result, _ = equalized(model, alpha=alpha, check=False)
    gm = result.graph_module
    x = torch.cat([b for b in calib_data().split(4)][:4])
    seen = {}
    # expand: its input columns are scaled and its output rows are not (the tail is refused)
    for name, module in (("model", model.expand), ("gm", gm.get_submodule("expand"))):
        module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].abs().amax(dim=(0, 2, 3))))
    with torch.no_grad():
        model(x), gm(x)
    r, r_new = seen["model"], seen["gm"]
    w, w_new = input_channel_absmax(model.expand), input_channel_absmax(gm.get_submodule("expand"))
    torch.testing.assert_close(r_new * w_new, r * w, rtol=1e-4, atol=1e-7)
    # the new ranges are r^(1-α)·w^(1-α): α = 1 makes them all 1
    torch.testing.assert_close(r_new, (r * w).pow(1 - alpha), rtol=1e-4, atol=1e-7)


def test_equalization_recovers_what_an_outlier_channel_costs():
    x = calib_data(4)
    pipeline = "trace,{}observe,calibrate,quantize,verify"

    def output_sqnr(model, eq):
        gm = compile(model, {**W8A8, "pipeline": pipeline.format("equalize," if eq else "")},
                     calib=calib_data())
        with torch.no_grad():
            return sqnr_db(model(x), gm(x))

    plain, spread, fixed = output_sqnr(chain(), False), output_sqnr(chain(50.0), False), \
        output_sqnr(chain(50.0), True)
    assert spread < plain - 10  # the outlier channel wastes the per-tensor range
    assert fixed > spread + 10 and fixed > plain - 3


def test_scales_guard_dead_channels_and_bad_alpha():
    s = equalization_scales(torch.tensor([0.0, 4.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), 0.5)
    assert s.tolist() == [1.0, 2.0, 1.0]
    with pytest.raises(PassError, match=r"alpha=1.5 is not in \[0, 1\]"):
        equalized(chain(), alpha=1.5)
    ctx = PassContext(recipe=Recipe.from_dict(W8A8), calib=None)
    gm = TracePass()(chain(), ctx).graph_module
    with pytest.raises(PassError, match="needs calibration data"):
        EqualizePass()(gm, ctx)


def test_saved_model_reloads_equal(tmp_path):
    model = chain(outlier=20.0)
    gm = compile(model, {**W8A8, "pipeline": "trace,equalize,observe,calibrate,quantize,verify"},
                 calib=calib_data())
    save(gm, tmp_path / "m.fxq")
    again = load(tmp_path / "m.fxq", chain(outlier=20.0))
    x = calib_data(2)
    with torch.no_grad():
        assert torch.equal(gm(x), again(x))
