"""Loading zoo models: the checkpoint layouts accepted (bare, wrapped, ``module.``-prefixed,
BasicSR's ``params_ema`` preferred), and errors that name what is wrong: a missing, unexpected
or misshapen key; a corrupt, truncated, missing or pickled-module file; an unknown model or
scale; pretrained weights that are not there, or given together with a checkpoint."""

from __future__ import annotations

import pytest
import torch

from fxquant.errors import CheckpointError, DataError, FxquantError
from fxquant.models import FSRCNN, IMDN, build_model, get_spec, load_checkpoint

from zoo_helpers import run


@pytest.fixture()
def fsrcnn_state(tmp_path):
    torch.manual_seed(0)
    model = FSRCNN(scale_factor=2).eval()
    return model, dict(model.state_dict())


def test_missing_key_is_named(tmp_path, fsrcnn_state):
    _, state = fsrcnn_state
    del state["mid_part.4.weight"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys: 'mid_part\.4\.weight'") as info:
        load_checkpoint(FSRCNN(scale_factor=2), path)
    assert "FSRCNN" in str(info.value)


def test_unexpected_key_is_named(tmp_path, fsrcnn_state):
    _, state = fsrcnn_state
    state["extra_head.weight"] = torch.zeros(3)
    path = tmp_path / "unexpected.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected keys: 'extra_head\.weight'"):
        load_checkpoint(FSRCNN(scale_factor=2), path)


def test_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "x3.pth"
    torch.save(IMDN(upscale=3).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"upsampler\.0\.weight: checkpoint \(27, 64, 3, 3\)"):
        build_model("imdn", 2, checkpoint=path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage" * 10])
def test_corrupt_file_names_the_path(tmp_path, content):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="corrupt.pth"):
        load_checkpoint(FSRCNN(scale_factor=2), path)


def test_truncated_file_names_the_path(tmp_path, fsrcnn_state):
    _, state = fsrcnn_state
    path = tmp_path / "truncated.pth"
    torch.save(state, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(FSRCNN(scale_factor=2), path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(FSRCNN(scale_factor=2), path)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(FSRCNN(scale_factor=2), path)
    with pytest.raises(CheckpointError, match=r"whole_model\.pth.*pickled Python object.*state_dict\(\)"):
        load_checkpoint(FSRCNN(scale_factor=2), path)


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "params", "params_ema", "model", "module."])
def test_checkpoint_layouts(tmp_path, fsrcnn_state, wrap):
    model, state = fsrcnn_state
    if wrap == "bare":
        obj = state
    elif wrap == "module.":
        obj = {"module." + k: v for k, v in state.items()}
    else:
        obj = {wrap: state, "epoch": 7}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    loaded = build_model("fsrcnn", 2, checkpoint=path)
    x = torch.rand(1, 1, 6, 6)
    assert torch.equal(run(loaded, x, 2), run(model, x, 2))


def test_params_ema_preferred_over_params(tmp_path, fsrcnn_state):
    model, state = fsrcnn_state
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / "basicsr.pth"
    torch.save({"params": zeros, "params_ema": state}, path)
    loaded = load_checkpoint(FSRCNN(scale_factor=2), path)
    assert torch.equal(loaded.last_part.weight, model.last_part.weight)


def test_unknown_model_lists_choices():
    with pytest.raises(FxquantError, match="unknown model 'vdsr'; available: imdn, pan, carn_m"):
        build_model("vdsr", 2)
    with pytest.raises(FxquantError, match="available: .*srresnet"):
        get_spec("vdsr")


def test_unsupported_scale_lists_choices():
    with pytest.raises(FxquantError, match=r"scale 8.*valid scales: 2, 3, 4"):
        build_model("imdn", 8)


def test_pretrained_without_weight_file():
    with pytest.raises(DataError, match="no pretrained weights.*checkpoint="):
        build_model("edsr_baseline", 2, pretrained=True)


def test_pretrained_and_checkpoint_are_exclusive(tmp_path):
    with pytest.raises(FxquantError, match="not both"):
        build_model("fsrcnn", 2, pretrained=True, checkpoint=tmp_path / "x.pth")
