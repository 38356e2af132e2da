"""The benchmark's competitor variants: each is close to fp32, none touches the user's model."""

from __future__ import annotations

import builtins

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.bench_variants import BUILDERS, Variant, VariantUnavailable, build_variants
from fxquant.errors import FxquantError


class TinySR(nn.Module):
    """Head conv, conv-ReLU-conv residual body, conv to 3*2*2 channels, pixel_shuffle x2."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.body1 = nn.Conv2d(16, 16, 3, padding=1)
        self.body2 = nn.Conv2d(16, 16, 3, padding=1)
        self.tail = nn.Conv2d(16, 12, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = h + self.body2(F.relu(self.body1(h)))
        return F.pixel_shuffle(self.tail(h), 2)


class ScaleArg(TinySR):
    """CARN-M-like forward(x, scale): the Python value of `scale` picks the branch."""

    def forward(self, x, scale):
        y = super().forward(x)
        return y if scale == 2 else F.interpolate(y, scale_factor=scale / 2)


# Error bounds per variant: absolute for the float ones, relative to output range for int8.
BOUNDS = {"fp32_eager": 1e-4, "fp32_channels_last": 1e-4, "fp32_compile": 1e-4,
          "bf16_autocast": 5e-2, "torch_ao_fx_int8": 0.1, "pt2e_int8": 0.1}
RELATIVE = {"torch_ao_fx_int8", "pt2e_int8"}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinySR().eval()
    x = torch.rand(1, 3, 16, 16)
    calib = [torch.rand(1, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        ref = model(x)
    return model, x, calib, ref


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registry_order():
    assert list(BUILDERS) == ["fp32_eager", "fp32_channels_last", "fp32_compile",
                              "bf16_autocast", "torch_ao_fx_int8", "pt2e_int8"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_variant_close_to_fp32_and_model_untouched(setup, name):
    if name == "pt2e_int8":
        pytest.importorskip("torchao")
    model, x, calib, ref = setup
    before = _state(model)
    variant = BUILDERS[name](model, x, calib)
    assert isinstance(variant, Variant) and variant.name == name and variant.note
    out = variant.fn(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape and not out.requires_grad
    err = (out - ref).abs().max().item()
    if name in RELATIVE:
        err /= (ref.max() - ref.min()).item()
    assert err < BOUNDS[name], f"{name}: error {err:.3g}"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), f"{name} modified the model"
    assert not model.training


def test_compiled_variants_of_two_models_keep_their_own_weights():
    # Dynamo caches per code object: a second same-class model must not reuse the first's
    # compiled artifact, and building it must not break the first.
    torch.manual_seed(2)
    a, b = TinySR().eval(), TinySR().eval()
    x = torch.rand(1, 3, 16, 16)
    va = BUILDERS["fp32_compile"](a, x, None)
    vb = BUILDERS["fp32_compile"](b, x, None)
    with torch.no_grad():
        ra, rb = a(x), b(x)
    assert (ra - rb).abs().max() > 1e-2
    assert torch.allclose(vb.fn(x), rb, atol=1e-4)
    assert torch.allclose(va.fn(x), ra, atol=1e-4)


def test_pt2e_restores_freezing_and_stays_right_at_a_new_size(setup):
    pytest.importorskip("torchao")
    import torch._inductor.config as inductor_config
    model, x, calib, _ = setup
    before = inductor_config.freezing
    variant = BUILDERS["pt2e_int8"](model, x, calib)
    assert inductor_config.freezing == before
    y = torch.rand(1, 3, 12, 20)  # a new H x W recompiles inside fn, with freezing on again
    with torch.no_grad():
        ref = model(y)
    err = (variant.fn(y) - ref).abs().max() / (ref.max() - ref.min())
    assert err < 0.1 and inductor_config.freezing == before


def test_concrete_args_bound_for_eager_and_fx():
    torch.manual_seed(1)
    model = ScaleArg().eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        ref = model(x, 4)
    built, missing = build_variants(model, x, [x], names=["fp32_eager", "torch_ao_fx_int8"],
                                    concrete_args={"scale": 4})
    assert missing == {} and [v.name for v in built] == ["fp32_eager", "torch_ao_fx_int8"]
    assert torch.equal(built[0].fn(x), ref)
    assert built[1].fn(x).shape == ref.shape == (1, 3, 32, 32)


def _hide_torchao(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torchao" or name.startswith("torchao."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_torchao_is_unavailable(setup, monkeypatch):
    model, x, calib, _ = setup
    _hide_torchao(monkeypatch)
    with pytest.raises(VariantUnavailable) as info:
        BUILDERS["pt2e_int8"](model, x, calib)
    assert isinstance(info.value, FxquantError) and info.value.name == "pt2e_int8"
    assert "pip install 'fxquant[bench]'" in info.value.reason
    built, missing = build_variants(model, x, calib, names=["fp32_eager", "pt2e_int8"])
    assert [v.name for v in built] == ["fp32_eager"] and list(missing) == ["pt2e_int8"]


class DataDependent(TinySR):
    def forward(self, x):
        y = super().forward(x)
        return y if y.sum() > 0 else -y  # data-dependent branch: torch.export refuses it


def test_pt2e_failure_gives_one_line_reason():
    pytest.importorskip("torchao")
    model = DataDependent().eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(VariantUnavailable) as info:
        BUILDERS["pt2e_int8"](model, x, None)
    assert info.value.reason and "\n" not in info.value.reason


def test_unknown_variant_name(setup):
    model, x, calib, _ = setup
    with pytest.raises(FxquantError, match="available: fp32_eager"):
        build_variants(model, x, calib, names=["int4_magic"])
