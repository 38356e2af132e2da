"""Model zoo: upstream checkpoints load strictly and reproduce their Set5 PSNR; every network
traces with torch.fx (checkpoint layouts and loading errors: test_model_loading.py).

Tests that need the shared data root use the ``data_dir`` fixture and skip when FXQUANT_DATA
is unset.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from PIL import Image

from fxquant.errors import FxquantError, TraceFailure
from fxquant.models import (
    EDSR, RDN, EDSRBaseline, ModelSpec, SRResNet, available_models, build_model, get_spec,
    load_checkpoint, read_state_dict,
)

from zoo_helpers import run

ZOO = ["imdn", "pan", "carn_m", "fsrcnn", "edsr", "edsr_baseline", "rdn", "srresnet"]
PRETRAINED = [(name, s) for name in ZOO for s in sorted(get_spec(name).weight_files)]
SET5 = ["baby", "bird", "butterfly", "head", "woman"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not os.environ.get("FXQUANT_DATA"):
        pytest.skip("FXQUANT_DATA is not set: point it at the shared data root (weights/, benchmark/) "
                    "to run the pretrained-checkpoint and Set5 PSNR tests")
    from fxquant.paths import data_root
    return data_root()


def channels(name: str) -> int:
    return 1 if get_spec(name).color == "y" else 3


# ---------------------------------------------------------------------------------------------
# registry


def test_registry_lists_the_zoo():
    assert available_models() == ZOO
    for name in ZOO:
        spec = get_spec(name)
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert set(spec.weight_files) <= set(spec.scales)
        assert set(spec.published_set5) <= set(spec.scales)
        assert spec.color in ("rgb", "y") and spec.description
    assert get_spec("carn_m").takes_scale and not get_spec("imdn").takes_scale
    assert set(get_spec("carn_m").weight_files.values()) == {"carn_m.pth"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("imdn").scales = (2,)


def test_build_returns_eval_mode():
    model = build_model("srresnet", 2)
    assert not model.training
    assert not any(m.training for m in model.modules())


# ---------------------------------------------------------------------------------------------
# 1. pretrained checkpoints load strictly


@pytest.mark.data
@pytest.mark.parametrize("name,scale", PRETRAINED)
def test_pretrained_checkpoint_loads_strict(data_dir, name, scale):
    spec = get_spec(name)
    path = data_dir / "weights" / spec.weight_files[scale]
    state = read_state_dict(path)
    model = build_model(name, scale, pretrained=True, data_root=data_dir)
    own = model.state_dict()
    assert set(own) == set(state), "checkpoint keys must equal the model's keys exactly"
    for key, value in state.items():
        assert torch.equal(own[key], value), key
    # and torch itself accepts the (prefix-stripped) file strictly
    fresh = build_model(name, scale)
    fresh.load_state_dict(state, strict=True)


@pytest.mark.data
def test_imdn_checkpoint_has_module_prefix(data_dir):
    raw = torch.load(data_dir / "weights" / "IMDN_x2.pth", map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in raw)


# ---------------------------------------------------------------------------------------------
# 2. Set5 PSNR-Y of the pretrained networks (METHODS.md section 2.4)


def _read_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@lru_cache(maxsize=None)
def _set5(root: str, scale: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    base = Path(root) / "benchmark" / "Set5"
    pairs = []
    for stem in SET5:
        lr = _read_rgb(base / "LR_bicubic" / f"X{scale}" / f"{stem}x{scale}.png")
        hr = _read_rgb(base / "HR" / f"{stem}.png")[: lr.shape[0] * scale, : lr.shape[1] * scale]
        pairs.append((lr, hr))
    return tuple(pairs)


def _y(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma in 16..235 (float, not rounded) of a 0..255 RGB array."""
    rgb = rgb.astype(np.float64)
    return 16.0 + (65.738 * rgb[..., 0] + 129.057 * rgb[..., 1] + 25.064 * rgb[..., 2]) / 256.0


def _psnr(d_y: np.ndarray, shave: int) -> float:
    d_y = d_y[shave:-shave, shave:-shave]
    return float(-10.0 * np.log10(np.mean(d_y ** 2)))


def set5_psnr(model, name: str, scale: int, root: Path) -> float:
    values = []
    for lr, hr in _set5(str(root), scale):
        if get_spec(name).color == "y":
            # FSRCNN: unrounded BT.601 Y of the LR image / 255 in; output clamped, x255, rounded;
            # compared with the unrounded Y of the HR image.
            x = torch.from_numpy((_y(lr) / 255.0).astype(np.float32))[None, None]
            sr = (run(model, x, scale)[0, 0].clamp(0, 1) * 255).round().double().numpy()
            d_y = (sr - _y(hr)) / 255.0
        else:
            x = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            sr = (run(model, x, scale)[0].clamp(0, 1) * 255).round().permute(1, 2, 0).double().numpy()
            d = (sr - hr.astype(np.float64)) / 255.0
            d_y = (65.738 * d[..., 0] + 129.057 * d[..., 1] + 25.064 * d[..., 2]) / 256.0
        assert sr.shape[:2] == hr.shape[:2]
        values.append(_psnr(d_y, scale))
    return float(np.mean(values))


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("name,scale", [(n, s) for n in ("imdn", "pan", "carn_m", "fsrcnn") for s in (2, 3, 4)])
def test_set5_psnr_matches_manifest(data_dir, name, scale):
    model = build_model(name, scale, pretrained=True, data_root=data_dir)
    psnr = set5_psnr(model, name, scale, data_dir)
    expected = get_spec(name).published_set5[scale]
    assert abs(psnr - expected) < 0.01, f"{name} x{scale}: Set5 PSNR-Y {psnr:.4f}, MANIFEST {expected}"


# ---------------------------------------------------------------------------------------------
# 3. EDSR, EDSR-baseline, RDN, SRResNet: shapes, key names, official defaults, round trip

SMALL = {
    "edsr": lambda s: EDSR(scale=s, n_resblocks=2, n_feats=16),
    "edsr_baseline": lambda s: EDSRBaseline(scale=s, n_resblocks=2, n_feats=16),
    "rdn": lambda s: RDN(scale=s, G0=16, D=2, C=2, G=8),
    "srresnet": lambda s: SRResNet(scale=s, n_resblocks=2, n_feats=16),
}


def _randomize_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("scale", [2, 4])
def test_random_weight_models_shape_and_round_trip(tmp_path, name, scale):
    torch.manual_seed(0)
    model = SMALL[name](scale).eval()
    _randomize_bn(model)
    x = torch.rand(1, 3, 12, 12)
    out = run(model, x, scale)
    assert out.shape == (1, 3, 12 * scale, 12 * scale)
    assert torch.isfinite(out).all()
    path = tmp_path / f"{name}_x{scale}.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    other = SMALL[name](scale).eval()
    assert not torch.equal(run(other, x, scale), out)
    assert load_checkpoint(other, path) is other
    assert torch.equal(run(other, x, scale), out)


UPSTREAM_KEYS = {
    "edsr_baseline": {2: ["sub_mean.weight", "sub_mean.bias", "head.0.weight", "body.0.body.0.weight",
                          "body.0.body.2.weight", "body.15.body.2.bias", "body.16.weight",
                          "tail.0.0.weight", "tail.1.weight", "add_mean.bias"],
                      4: ["tail.0.0.weight", "tail.0.2.weight", "tail.1.weight"]},
    "edsr": {2: ["head.0.weight", "body.31.body.2.weight", "body.32.weight", "tail.0.0.weight"],
             4: ["tail.0.2.weight", "tail.1.bias"]},
    "rdn": {2: ["SFENet1.weight", "SFENet2.weight", "RDBs.0.convs.0.conv.0.weight",
                "RDBs.15.convs.7.conv.0.bias", "RDBs.15.LFF.weight", "GFF.0.weight", "GFF.1.weight",
                "UPNet.0.weight", "UPNet.2.weight"],
            4: ["UPNet.0.weight", "UPNet.2.weight", "UPNet.4.weight"]},
    "srresnet": {2: ["sub_mean.weight", "add_mean.bias", "head.0.weight", "head.1.weight",
                     "body.0.conv1.weight", "body.0.bn1.running_var", "body.15.conv2.weight",
                     "body.15.bn2.bias", "body.16.weight", "body.17.running_mean",
                     "tail.0.0.weight", "tail.0.2.weight", "tail.1.weight"],
                 4: ["tail.0.3.weight", "tail.0.5.weight"]},
}


@pytest.mark.parametrize("name", list(UPSTREAM_KEYS))
@pytest.mark.parametrize("scale", [2, 4])
def test_upstream_key_names(name, scale):
    keys = set(build_model(name, scale).state_dict())
    missing = [k for k in UPSTREAM_KEYS[name][scale] if k not in keys]
    assert not missing, f"{name} x{scale} lacks upstream keys {missing}"


def test_official_default_configs():
    base = EDSRBaseline(scale=2).state_dict()
    assert base["head.0.weight"].shape == (64, 3, 3, 3) and "body.16.weight" in base and "body.17.weight" not in base
    assert all(b.res_scale == 1 for b in EDSRBaseline(scale=2).body[:16])
    full = EDSR(scale=2)
    assert full.state_dict()["head.0.weight"].shape == (256, 3, 3, 3)
    assert len(full.body) == 33 and all(b.res_scale == 0.1 for b in full.body[:32])
    assert full.rgb_range == 255 and torch.allclose(
        full.sub_mean.bias, -255 * torch.tensor([0.4488, 0.4371, 0.4040]))
    rdn = RDN(scale=2)
    assert len(rdn.RDBs) == 16 and len(rdn.RDBs[0].convs) == 8
    assert rdn.SFENet1.out_channels == 64 and rdn.RDBs[0].convs[0].conv[0].out_channels == 64
    assert rdn.RDBs[0].LFF.in_channels == 64 + 8 * 64
    srr = SRResNet(scale=4)
    assert len(srr.body) == 18 and srr.head[0].weight.shape == (64, 3, 9, 9) and srr.head[0].bias is None
    assert srr.tail[0][0].bias is None and srr.tail[0][0].out_channels == 256


def test_rgb_range_scaling_matches_upstream_range():
    """With rgb_range=255, forward([0,1]) equals the upstream network run on [0,255], / 255."""
    torch.manual_seed(0)
    model = EDSRBaseline(scale=2, n_resblocks=1, n_feats=8).eval()
    x = torch.rand(1, 3, 6, 6)
    with torch.inference_mode():
        up = model.add_mean(model.tail(model.body(model.head(model.sub_mean(x * 255))) +
                                       model.head(model.sub_mean(x * 255))))
        assert torch.allclose(model(x), up / 255, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 4. every zoo network traces, and the traced module equals eager


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_symbolic_trace_matches_eager(name, scale):
    torch.manual_seed(0)
    model = build_model(name, scale)
    x = torch.rand(1, channels(name), 8, 10)
    if get_spec(name).takes_scale:
        traced = torch.fx.symbolic_trace(model, concrete_args={"scale": scale})
        with torch.inference_mode():
            eager, got = model(x, scale), traced(x, scale)
    else:
        traced = torch.fx.symbolic_trace(model)
        with torch.inference_mode():
            eager, got = model(x), traced(x)
    assert got.shape == (1, channels(name), 8 * scale, 10 * scale)
    assert torch.equal(eager, got)
    called = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert called, "convolutions should stay call_module nodes"


def test_carn_m_needs_concrete_scale():
    with pytest.raises(TraceFailure, match="concrete_args"):
        torch.fx.symbolic_trace(build_model("carn_m", 2))


def test_carn_m_rejects_unknown_scale_at_run_time():
    with pytest.raises(FxquantError, match="scales 2, 3, 4, got 5"):
        run(build_model("carn_m", 2), torch.rand(1, 3, 4, 4), 5)


def test_carn_m_multiscale_uses_shared_residual_block():
    model = build_model("carn_m", 2)
    traced = torch.fx.symbolic_trace(model, concrete_args={"scale": 3})
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    assert targets.count("b1.b1.body.0") == 3
    assert any(t.startswith("upsample.up3") for t in targets)
    assert not any(t.startswith(("upsample.up2", "upsample.up4")) for t in targets)


# ---------------------------------------------------------------------------------------------
# 5. IMDN's contrast square root


def test_imdn_contrast_square_root_keeps_values_and_a_finite_gradient():
    """IMDN's contrast term equals upstream's ``pow(0.5)`` bit for bit (NaN included), and a
    channel that quantization made constant (variance exactly 0) no longer turns every QAT
    gradient into NaN."""
    from fxquant.models.imdn import CCALayer, safe_sqrt

    torch.manual_seed(0)
    variance = torch.cat([torch.rand(1000) ** 4, torch.zeros(3), torch.tensor([float("nan")])])
    torch.testing.assert_close(safe_sqrt(variance), variance.pow(0.5), rtol=0, atol=0,
                               equal_nan=True)
    x = torch.rand(2, 64, 6, 6)
    x[:, 5] = 0.25  # a constant channel: variance exactly 0
    x.requires_grad_(True)
    layer = CCALayer(64)
    layer(x).sum().backward()
    assert bool(torch.isfinite(x.grad).all())
    x_upstream = x.detach().clone().requires_grad_(True)
    mean = x_upstream.mean((2, 3), keepdim=True)
    ((x_upstream - mean) ** 2).mean((2, 3), keepdim=True).pow(0.5).sum().backward()
    assert not bool(torch.isfinite(x_upstream.grad).all())  # what upstream's sqrt does
