"""The public API: a user's own model compiles with nothing registered; compiled models save
and load safely; recipes come in every accepted form."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import fxquant
from fxquant import CheckpointError
from fxquant.metrics import sqnr_db


class MyOwnSR(nn.Module):
    """Not in the zoo: an ESPCN-like net with a PReLU and a bilinear global skip."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 16, 5, padding=2)
        self.act = nn.PReLU(16)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.last = nn.Conv2d(16, 3 * 9, 3, padding=1)

    def forward(self, x):
        skip = nn.functional.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)
        h = self.mid(self.act(self.first(x)))
        return nn.functional.pixel_shuffle(self.last(h), 3) + skip


@pytest.fixture
def own_model():
    torch.manual_seed(3)
    return MyOwnSR().eval()


def test_users_own_model_compiles_and_runs_like_the_model(own_model):
    calib = torch.rand(8, 3, 16, 16)
    gm = fxquant.compile(own_model, "minmax-w8a8", calib=calib, example_inputs=(calib[:1],))
    assert isinstance(gm, fx.GraphModule)
    x = torch.rand(2, 3, 20, 14)
    with torch.no_grad():
        ref, out = own_model(x), gm(x)
    assert out.shape == ref.shape == (2, 3, 60, 42)
    assert sqnr_db(ref, out) > 35
    assert [n for n, m in gm.named_modules() if isinstance(m, fxquant.quant.QuantConv2d)] == ["mid"]


def test_state_dict_round_trips_through_weights_only_load(own_model, tmp_path):
    calib = torch.rand(8, 3, 16, 16)
    gm = fxquant.compile(own_model, "mse-w4a4", calib=calib)
    torch.save(gm.state_dict(), tmp_path / "sd.pt")
    fresh = fxquant.compile(MyOwnSR().eval(), "mse-w4a4", calibrate=False)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = torch.rand(1, 3, 10, 10)
    assert torch.equal(fresh(x), gm(x))


def test_save_and_load_a_compiled_model(own_model, tmp_path):
    gm = fxquant.compile(own_model, "percentile-w4a4", calib=torch.rand(8, 3, 16, 16))
    fxquant.save(gm, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=MyOwnSR())
    x = torch.rand(1, 3, 10, 10)
    assert torch.equal(loaded(x), gm(x))
    assert loaded.fxquant_recipe == gm.fxquant_recipe


def test_loading_garbage_or_foreign_files_is_a_checkpoint_error(tmp_path):
    (tmp_path / "junk.fxq").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read compiled model"):
        fxquant.load(tmp_path / "junk.fxq", model=MyOwnSR())
    torch.save({"weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not an fxquant compiled model"):
        fxquant.load(tmp_path / "plain.pt", model=MyOwnSR())
    with pytest.raises(CheckpointError, match="does not exist"):
        fxquant.load(tmp_path / "missing.fxq")


def test_unreadable_compiled_files_say_why_in_one_line(own_model, tmp_path):
    """torch's own weights_only message runs to a page and advises weights_only=False."""
    (tmp_path / "empty.fxq").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.fxq: the file is empty \(0 bytes\)"):
        fxquant.load(tmp_path / "empty.fxq", model=MyOwnSR())
    torch.save({"format": MyOwnSR()}, tmp_path / "pickled.fxq")  # a whole module: code
    with pytest.raises(CheckpointError, match=r"pickled Python object \(.*MyOwnSR\).*"
                                              r"nothing in them is executed") as info:
        fxquant.load(tmp_path / "pickled.fxq", model=MyOwnSR())
    gm = fxquant.compile(own_model, "minmax-w8a8", calib=torch.rand(4, 3, 16, 16))
    fxquant.save(gm, tmp_path / "m.fxq")
    data = (tmp_path / "m.fxq").read_bytes()
    (tmp_path / "cut.fxq").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated") as cut:
        fxquant.load(tmp_path / "cut.fxq", model=MyOwnSR())
    for message in (str(info.value), str(cut.value)):
        assert "\n" not in message and "weights_only=False" not in message


def test_loading_into_a_mismatched_model_is_a_checkpoint_error(own_model, tmp_path):
    gm = fxquant.compile(own_model, "minmax-w8a8", calib=torch.rand(4, 3, 16, 16))
    fxquant.save(gm, tmp_path / "m.fxq")

    class Other(MyOwnSR):
        def __init__(self):
            super().__init__()
            self.extra = nn.Conv2d(16, 16, 1)

        def forward(self, x):
            return super().forward(x) + 0 * self.extra(self.first(x)).mean()

    with pytest.raises(CheckpointError, match="does not match"):
        fxquant.load(tmp_path / "m.fxq", model=Other())


def test_explicit_pipeline_and_dump_dir(own_model, tmp_path):
    gm = fxquant.compile(own_model, "minmax-w8a8", calib=torch.rand(4, 3, 16, 16),
                         pipeline="trace,observe{observer=mse},calibrate,quantize{a=6},verify",
                         dump_dir=tmp_path)
    assert gm.fxquant_pipeline == "trace,observe{observer=mse},calibrate,quantize{a=6},verify"
    assert len(list(tmp_path.glob("*.txt"))) == 5


def test_observer_option_in_the_pipeline_decides_the_range_method(own_model):
    calib = torch.rand(8, 3, 16, 16)
    via_pipeline = fxquant.compile(own_model, "minmax-w4a4", calib=calib,
                                   pipeline="trace,observe{observer=mse},calibrate,quantize,verify")
    via_recipe = fxquant.compile(own_model, "mse-w4a4", calib=calib)
    minmax = fxquant.compile(own_model, "minmax-w4a4", calib=calib)
    scale = lambda gm: float(gm.get_submodule("mid_input_quantizer").scale)  # noqa: E731
    assert scale(via_pipeline) == scale(via_recipe) != scale(minmax)


@pytest.mark.parametrize("recipe", ["minmax-w4a4", "dfsq-static-w4a4", "daq-w4a4"])
def test_compile_and_training_never_touch_the_users_model(tiny_sr, calib, recipe):
    """The compiled model owns its weights: compiling (folds included), a training step on
    the compiled model and switching its quantizers leave the float model as it was."""
    tiny_sr.train()
    before = {k: v.clone() for k, v in tiny_sr.state_dict().items()}
    gm = fxquant.compile(tiny_sr, recipe, calib=calib)
    assert tiny_sr.training  # its mode is given back too
    gm.train()
    loss = gm(calib[:2]).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in gm.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    ours = {id(p) for p in tiny_sr.parameters()}
    assert not ours & {id(p) for p in gm.parameters()}
    for key, value in tiny_sr.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
