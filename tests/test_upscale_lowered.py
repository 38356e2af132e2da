"""``fxquant upscale --lower``: the integer targets through the command line (reference,
gpu under the Triton interpreter, cpu with the lower pass's options), and what a compiled
lowered model costs the receptive-field probe."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fxquant.cli import main

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:no --weights")]

TINY = f"{Path(__file__).parent / 'fixtures' / 'tiny_sr.py'}:TinySR"


def _saved_tiny(tmp_path, recipe: str):
    """The tiny own model compiled with ``recipe`` and saved, its model flags, and a 12×14
    input image: ``(saved path, flags, image path)``."""
    saved = str(tmp_path / "tiny.fxq")
    own = ["--model", TINY, "--init", '{"upscale": 2}']
    assert main(["compile", *own, "--recipe", recipe, "--out", saved]) == 0
    good = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 14, 3),
                                                  dtype=np.uint8)).save(good)
    return saved, own, good


def test_lower_gpu_writes_the_reference_targets_image(data, tmp_path, monkeypatch, capsys):
    """--lower gpu (here the Triton interpreter, as on a machine without CUDA) writes the PNG
    that --lower reference writes; without CUDA or the interpreter it says how to run it."""
    saved, own, good = _saved_tiny(tmp_path, "minmax-w8a8")
    outs = {}
    for target in ("reference", "gpu"):
        outs[target] = tmp_path / f"{target}.png"
        assert main(["upscale", str(good), "--out", str(outs[target]), "--compiled", saved,
                     *own, "--lower", target, "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(outs["gpu"])),
                          np.asarray(Image.open(outs["reference"])))
    if torch.cuda.is_available():
        return
    monkeypatch.delenv("TRITON_INTERPRET")
    assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--compiled", saved,
                 *own, "--lower", "gpu", "--quiet"]) == 2
    assert "no CUDA device (set TRITON_INTERPRET=1" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_lower_options_reach_the_lower_pass_and_bad_ones_are_named(data, tmp_path, capsys):
    """--lower-options: the lower pass's own options (here one weight plane and one-byte DFSQ
    codes, which change the image against the default lowering); wrong ones are refused
    before anything is compiled or written."""
    saved, own, good = _saved_tiny(tmp_path, "dfsq-w4a4")
    outs = {}
    for name, extra in (("default", []), ("fast", ["--lower-options", "planes=1,subset_codes=u8"]),
                        ("again", ["--lower-options", "planes=1, subset-codes=u8"])):
        outs[name] = tmp_path / f"{name}.png"
        assert main(["upscale", str(good), "--out", str(outs[name]), "--compiled", saved, *own,
                     "--lower", "cpu", *extra]) == 0
    err = capsys.readouterr().err
    assert "lowered (cpu; planes=1,subset_codes=u8)" in err and "lowered (cpu)" in err
    images = {k: np.asarray(Image.open(v)) for k, v in outs.items()}
    assert np.array_equal(images["fast"], images["again"])
    assert not np.array_equal(images["fast"], images["default"])
    cases = [(["--lower", "cpu", "--lower-options", "planes=3"], "lower.planes=3"),
             (["--lower", "cpu", "--lower-options", "speed=max"], "unknown option 'speed'"),
             (["--lower", "cpu", "--lower-options", "target=gpu"], "the target is --lower's"),
             (["--lower", "cpu", "--lower-options", "{planes=1}"], "without braces"),
             (["--lower", "reference", "--lower-options", "compile=true"],
              "lower.compile applies to target=cpu only"),
             (["--lower-options", "planes=1"], "--lower-options needs --lower")]
    for extra, message in cases:
        assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--compiled", saved,
                     *own, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("fxquant upscale: error: ") and message in err, err
    assert not (tmp_path / "o.png").exists()


def test_the_probe_of_a_compiled_lowered_model_compiles_nothing(data, tmp_path, monkeypatch):
    """With compile=true the receptive-field probe runs the same lowered model uncompiled:
    its three sizes would each have compiled the graph (seconds to minutes each) for nothing;
    the image itself still runs compiled."""
    import fxquant.upscale as upscale
    from torch._dynamo.utils import counters

    saved, own, good = _saved_tiny(tmp_path, "minmax-w8a8")
    measured, graphs = upscale.receptive_radius, []

    def probe(fn, channels, scale):
        before = counters["stats"]["unique_graphs"]
        result = measured(fn, channels, scale)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        return result

    monkeypatch.setattr(upscale, "receptive_radius", probe)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--compiled", saved,
                 *own, "--lower", "cpu", "--lower-options", "compile=true", "--quiet"]) == 0
    assert graphs == [0] and counters["stats"]["unique_graphs"] > before


@pytest.mark.parametrize("options, noted", [("compile=true", True),
                                            ("compile=true,dynamic=true", False),
                                            ("planes=1", False)])
def test_static_compile_over_several_window_shapes_is_noted(tmp_path, capsys, monkeypatch,
                                                            options, noted):
    """Images of two sizes run whole (--tile 0) are two window shapes: with compile=true
    (static shapes) each compiles a graph of its own, so the command suggests dynamic=true;
    nothing is compiled here (the model is a stand-in), only what is said is checked."""
    import fxquant.upscale as upscale

    spec = SimpleNamespace(channels=3, color="rgb")

    def stand_in(x):
        return torch.nn.functional.interpolate(x, scale_factor=2)

    monkeypatch.setattr(upscale, "sr_function",
                        lambda args, lowered: (stand_in, stand_in, spec, 2, "stand-in"))
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate([(12, 14), (10, 9)]):
        Image.fromarray(np.zeros(size + (3,), np.uint8)).save(folder / f"im{i}.png")
    assert main(["upscale", str(folder), "--out", str(tmp_path / "out"), "--model", TINY,
                 "--recipe", "minmax-w8a8", "--lower", "cpu", "--lower-options", options,
                 "--tile", "0"]) == 0
    err = capsys.readouterr().err
    assert ("the windows come in 2 shapes, and compile=true compiles a graph for each: add "
            "dynamic=true" in err) == noted, err
