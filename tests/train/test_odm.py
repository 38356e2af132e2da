"""ODM's cooperative regularization: the feature tap sees every static activation quantizer's
input; v1 keeps the regularizer's gradient only where its sign agrees with reconstruction's,
v2 scales it by (cos + 1)/2; the losses measure what their formulas say."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.train.odm import (
    FeatureTap,
    cooperative_gradients,
    mismatch_loss,
    variance_loss,
)


def quantized(tiny_sr):
    calib = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return fxquant.compile(tiny_sr, "mse-w4a4", calib=calib)


def test_the_tap_sees_each_activation_quantizer_once_per_forward(tiny_sr):
    gm = quantized(tiny_sr)
    with FeatureTap(gm) as tap:
        gm(torch.rand(2, 3, 8, 8))
    # TinySR: head and tail stay float; four block convs, each with an input quantizer
    assert len(tap.features) == 4 and len(tap.quantizers) == 4
    assert all(f.shape[0] == 2 for f in tap.features)
    gm(torch.rand(1, 3, 8, 8))
    assert len(tap.features) == 4  # hooks removed on exit


def test_variance_loss_is_the_across_image_spread_over_the_range_squared():
    class Q(torch.nn.Module):
        scale, qmin, qmax = torch.tensor(0.5), 0, 3  # range width 1.5

    x = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 3.0)])  # means 0 and 3
    # Var_n μ = 4.5 (unbiased), Var_n σ = 0
    assert float(variance_loss([x], [Q()])) == pytest.approx(4.5 / 1.5 ** 2)
    assert float(variance_loss([x[:1]], [Q()])) == 0.0


def test_mismatch_loss_is_the_norm_of_the_quantization_error(tiny_sr):
    gm = quantized(tiny_sr)
    with FeatureTap(gm) as tap:
        gm(torch.rand(2, 3, 8, 8))
    q = tap.quantizers[0]
    x = tap.features[0]
    expected = torch.linalg.vector_norm(x - q.fake_quant(x))
    assert float(mismatch_loss([x], [q]).detach()) == pytest.approx(float(expected.detach()))


def _toy():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    recon = (w * torch.tensor([1.0, 1.0, -1.0])).sum()  # g_R = [1, 1, -1]
    reg = (w * torch.tensor([2.0, -2.0, -4.0])).sum()  # g_M = [2, -2, -4]
    return w, recon, reg


def test_v1_keeps_the_regularizer_only_where_the_signs_agree():
    w, recon, reg = _toy()
    info = cooperative_gradients(recon, reg, [w], mode="v1", weight=0.5)
    assert w.grad.tolist() == [1 + 0.5 * 2, 1.0, -1 + 0.5 * -4]
    assert info["agreement"] == pytest.approx(2 / 3)


def test_v2_scales_the_regularizer_by_the_cosine_similarity():
    w, recon, reg = _toy()
    info = cooperative_gradients(recon, reg, [w], mode="v2", weight=0.5)
    g_r, g_m = torch.tensor([1.0, 1, -1]), torch.tensor([2.0, -2, -4])
    sim = (torch.dot(g_r, g_m) / (g_r.norm() * g_m.norm()) + 1) / 2
    assert torch.allclose(w.grad, g_r + 0.5 * sim * g_m)
    assert info["agreement"] == pytest.approx(float(sim))


def test_an_opposed_regularizer_adds_nothing_in_v2():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    recon, reg = w.sum(), -w.sum()
    cooperative_gradients(recon, reg, [w], mode="v2", weight=10.0)
    assert w.grad.tolist() == [1.0, 1.0]


def test_a_training_step_with_v2_runs_through_a_compiled_model(tiny_sr):
    gm = quantized(tiny_sr)
    params = [p for p in gm.parameters() if p.requires_grad]
    x = torch.rand(2, 3, 8, 8)
    target = tiny_sr(x).detach()
    with FeatureTap(gm) as tap:
        out = gm(x)
    recon = (out - target).abs().mean()
    cooperative_gradients(recon, mismatch_loss(tap.features, tap.quantizers), params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_train_hooks_regularize_training_forwards_only(tiny_sr, version):
    from types import SimpleNamespace

    from fxquant.passes.inject_offsets import ODMOptions
    from fxquant.train.odm import odm_hooks

    gm = quantized(tiny_sr)
    (regularizer,), backward = odm_hooks(gm, ODMOptions(version=version, reg_weight=0.1))
    with torch.no_grad():
        gm(torch.rand(2, 3, 8, 8))  # an evaluation forward: nothing kept
    assert regularizer.features == []
    x = torch.rand(2, 3, 8, 8)
    out = gm(x)
    recon = (out - tiny_sr(x).detach()).abs().mean()
    ctx = SimpleNamespace(recon_loss=recon, average=lambda ts: ts)
    reg = regularizer(ctx)
    assert reg.requires_grad and float(reg.detach()) > 0 and regularizer.features == []
    params = [p for p in gm.parameters() if p.requires_grad]
    info = backward(ctx, {"recon": recon, regularizer.name: reg}, params)
    assert 0.0 <= info["agreement"] <= 1.0
    assert all(p.grad is not None for p in params)
