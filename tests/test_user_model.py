"""Own models from the command line: --model file.py:Class with --weights, --init, --color,
--range; clear errors for each way the reference can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fxquant
from fxquant.cli import main
from fxquant.errors import CheckpointError, FxquantError
from fxquant.models.user import UserModelSpec, resolve_model
from fxquant.workflow import as_sr_function

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:no --weights")]

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_sr.py"
TINY = f"{FIXTURE}:TinySR"


def _weights(tmp_path: Path, upscale: int = 2, features: int = 8, seed: int = 3) -> Path:
    source = resolve_model(TINY, init={"upscale": upscale, "features": features})
    torch.manual_seed(seed)
    model = source.build()
    path = tmp_path / f"tiny_x{upscale}_f{features}.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.filterwarnings("default")
def test_class_is_built_with_init_and_its_scale_found_by_running_it():
    with pytest.warns(UserWarning, match="no --weights for .*TinySR: it runs with the weights "
                                         "its constructor gives it"):
        source = resolve_model(TINY, init='{"upscale": 3}')
    assert source.scale == 3 and source.is_user
    assert isinstance(source.spec, UserModelSpec)
    assert source.spec.scales == (3,) and source.spec.color == "rgb"
    assert not source.spec.takes_scale
    out = source.build()(torch.rand(1, 3, 5, 7))
    assert out.shape == (1, 3, 15, 21)


def test_a_factory_function_and_a_package_module_work(tmp_path, monkeypatch):
    assert resolve_model(f"{FIXTURE}:make_tiny", init={"upscale": 4}).scale == 4
    package = tmp_path / "mysr"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FIXTURE.read_text())
    monkeypatch.syspath_prepend(str(tmp_path))
    source = resolve_model("mysr.nets:TinySR", init={"upscale": 3})
    assert source.scale == 3 and type(source.build()).__module__ == "mysr.nets"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_load_from_pth_and_safetensors(tmp_path, suffix):
    pth = _weights(tmp_path)
    path = pth
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "tiny.safetensors"
        save_file(torch.load(pth, weights_only=True), path)
    built = resolve_model(TINY, weights=str(path)).build()
    expected = torch.load(pth, weights_only=True)
    for key, value in built.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_weights_that_do_not_match_name_the_keys_and_shapes(tmp_path):
    wrong = _weights(tmp_path, features=4)
    with pytest.raises(CheckpointError, match=r"TinySR.*shape mismatches: body\.0\.weight: "
                                              r"checkpoint \(4, 3, 3, 3\) vs model \(8, 3, 3, 3\)"):
        resolve_model(TINY, weights=str(wrong))
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.pth.*not a torch.save file"):
        resolve_model(TINY, weights=str(text))


@pytest.mark.parametrize("reference, kwargs, message", [
    ("tests/fixtures/nowhere.py:TinySR", {}, r"model file tests/fixtures/nowhere\.py does not "
                                             r"exist; --model takes path/to/file\.py:ClassName"),
    (f"{FIXTURE}:Missing", {}, r"defines no class 'Missing'; nn\.Module classes it defines: "
                               r"TinySR, TinySR255"),
    (f"{FIXTURE}:NOT_A_MODEL", {}, r"defines no class 'NOT_A_MODEL'"),
    (TINY, {"init": "{upscale: 2}"}, r"--init '\{upscale: 2\}' is not valid JSON \(Expecting "
                                     r"property name"),
    (TINY, {"init": "[2]"}, r"--init must be a JSON object of constructor arguments, got a list"),
    (TINY, {"init": '{"scale": 2}'}, r"does not fit .*TinySR\(upscale: int = 2, channels: int "
                                     r"= 3, features: int = 8\): got an unexpected keyword"),
    (TINY, {"scale": 4}, r"TinySR upscales x2, not x4 \(--scale\)"),
    (TINY, {"color": "y"}, r"fails on a 1×1×8×8 input .*check --color"),
    ("imdn", {"scale": 4, "init": "{}"}, r"--init only for your own model"),
    ("not_a_module_anywhere:Net", {}, r"cannot import module 'not_a_module_anywhere'"),
])
def test_each_wrong_reference_says_what_would_be_valid(reference, kwargs, message):
    with pytest.raises(FxquantError, match=message):
        resolve_model(reference, **kwargs)


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for argv, message in [
        (["--model", "tests/fixtures/none.py:Net"], "model file tests/fixtures/none.py does not"),
        (["--model", f"{FIXTURE}:Nope"], "classes it defines: TinySR, TinySR255"),
        (["--model", TINY, "--init", "{'upscale': 2}"], "is not valid JSON"),
        (["--model", TINY, "--weights", str(_weights(tmp_path, features=4))],
         "shape mismatches"),
    ]:
        code = main(["upscale", str(image), "--out", str(tmp_path / "o.png"), "--recipe", "fp",
                     *argv])
        err = capsys.readouterr().err
        assert code == 2 and "fxquant upscale: error: " in err and message in err, err
        assert "Traceback" not in err


def test_range_255_is_applied_around_the_model_not_inside_it(tmp_path):
    weights = str(_weights(tmp_path))
    unit = resolve_model(TINY, weights=weights)
    ranged = resolve_model(f"{FIXTURE}:TinySR255", weights=weights, value_range=255)
    assert ranged.value_range == 255 and ranged.spec.value_range == 255
    x = torch.rand(1, 3, 10, 10)
    a = as_sr_function(unit.build(), unit.spec, 2)(x)
    b = as_sr_function(ranged.build(), ranged.spec, 2)(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.data
def test_range_255_model_is_compiled_as_it_is_and_calibrated_on_0_255(data, tmp_path):
    from fxquant.workflow import prepare

    weights = str(_weights(tmp_path))
    ranged = resolve_model(f"{FIXTURE}:TinySR255", weights=weights, value_range=255)
    models = prepare(ranged, None, "minmax-w8a8")
    gm = models.quant_model
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        native = gm(x * 255)  # the compiled graph takes the model's own 0..255 input
        unit = resolve_model(TINY, weights=weights).build()(x)
        torch.testing.assert_close(models.runner("quant")(x), native / 255)
    # calibrated on 0..255 patches: the 8-bit output matches the float model to a few levels
    assert float((native / 255 - unit).abs().max()) < 8 / 255


@pytest.mark.data
def test_cli_eval_compile_upscale_an_own_model(data, tmp_path, capsys):
    weights = str(_weights(tmp_path))
    common = ["--model", TINY, "--weights", weights, "--init", '{"upscale": 2}']
    assert main(["eval", *common, "--recipe", "minmax-w8a8", "--datasets", "Set5",
                 "--limit", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scale"] == 2 and report["model"] == TINY
    fp, quant = report["datasets"]["Set5"]["fp"], report["datasets"]["Set5"]["quant"]
    assert fp["psnr"] > 10 and abs(quant["psnr"] - fp["psnr"]) < 3

    compiled = tmp_path / "tiny.fxq"
    assert main(["compile", *common, "--recipe", "minmax-w8a8", "--out", str(compiled)]) == 0
    capsys.readouterr()
    info = torch.load(compiled, weights_only=True)["model"]
    assert info["name"] is None and info["scale"] == 2
    assert info["user"]["reference"] == TINY and json.loads(info["user"]["init"]) == {"upscale": 2}
    assert info["user"]["range"] == 1 and info["user"]["color"] == "rgb"
    with pytest.raises(CheckpointError, match=r"names no zoo model: pass model= .*TinySR"):
        fxquant.load(compiled)

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)).save(image)
    # without --model the file says how it was made; user code is not imported from it
    assert main(["upscale", str(image), "--out", str(tmp_path / "x.png"),
                 "--compiled", str(compiled)]) == 2
    assert f"give --model file.py:Class; it was compiled from --model {TINY}" in \
        capsys.readouterr().err
    out = tmp_path / "up.png"
    assert main(["upscale", str(image), "--out", str(out), "--compiled", str(compiled),
                 "--model", TINY, "--quiet"]) == 0  # --init and --weights from the file
    up = np.asarray(Image.open(out))
    assert up.shape == (40, 48, 3)
    gm = fxquant.load(compiled, resolve_model(TINY, weights=weights).build())
    from fxquant.evaluate import super_resolve

    assert np.array_equal(up, super_resolve(gm, np.asarray(Image.open(image)), "rgb"))


def test_bench_times_an_own_model(capsys):
    assert main(["bench", "--models", f"{FIXTURE}:TinySR255", "--range", "255", "--init",
                 '{"upscale": 3}', "--scale", "3", "--variants", "fp32_eager", "--size", "16",
                 "--rounds", "1", "--no-psnr"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith(f"| {FIXTURE}:TinySR255 | fp32_eager |"))
    assert "1.00×" in row
    # the scale bench asks for is checked against the model's own
    assert main(["bench", "--models", TINY, "--scale", "4", "--variants", "fp32_eager",
                 "--no-psnr"]) == 2
    assert "TinySR upscales x2, not x4" in capsys.readouterr().err
