"""Deployment through torch: torch.export and TorchScript round trips, and the errors that
name what cannot export. Apart from tests/test_export.py (ONNX) so that these run where
onnx and onnxruntime are not installed."""

from __future__ import annotations

import pytest
import torch

import fxquant
from fxquant.deploy import ExportError, export
from fxquant.deploy.torch_export import exportable_module, load_program

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("recipe,target", [
    (r, t) for r in ("mse-w8a8-sym", "minmax-w8a8") for t in ("fake-quant", "reference")]
    + [("dfsq-w4a4", "reference")])  # DFSQ's integer form captures (its fake-quant: refused)
def test_torch_export_round_trip(tiny_sr, calib, tmp_path, recipe, target):
    gm = fxquant.compile(tiny_sr, recipe, calib=calib)
    path = tmp_path / "tiny.pt2"
    export(gm, path, format="torch-export", target=target)
    loaded = load_program(path)
    original = exportable_module(gm, target)
    for shape in [(1, 3, 12, 10), (3, 3, 9, 13)]:  # batch, height and width are dynamic
        x = torch.rand(*shape)
        with torch.no_grad():
            assert torch.equal(loaded(x), original(x))


def test_torch_export_errors_name_what_cannot_export(tiny_sr, calib, tmp_path):
    gm = fxquant.compile(tiny_sr, "mse-w8a8-sym", calib=calib)
    with pytest.raises(ExportError, match="cpu target holds oneDNN's prepacked weights"):
        export(gm, tmp_path / "x.pt2", format="torch-export", target="cpu")
    for recipe, kind in (("daq-w4a4", "daq"), ("dfsq-w4a4", "subset")):
        dynamic = fxquant.compile(tiny_sr, recipe, calib=calib)
        with pytest.raises(ExportError, match=rf"recipe '{recipe}'.*module '[\w.]+' \({kind}:"):
            export(dynamic, tmp_path / "x.pt2", format="torch-export")
    # DAQ's integer form is lowered but not capturable (DFSQ's is: the round trip above)
    with pytest.raises(ExportError, match="cannot capture recipe"):
        export(fxquant.compile(tiny_sr, "daq-w4a4", calib=calib), tmp_path / "x.pt2",
               format="torch-export", target="reference")
    assert not (tmp_path / "x.pt2").exists()


@pytest.mark.parametrize("recipe", ["mse-w8a8-sym", "daq-w4a4", "dfsq-w4a4"])
def test_torchscript_trace_round_trip(tiny_sr, calib, tmp_path, recipe):
    """DAQ's and DFSQ's per-input statistics are tensor ops: the checked trace keeps them
    dynamic, so a reloaded trace matches the model on an input of another size and content."""
    gm = fxquant.compile(tiny_sr, recipe, calib=calib)
    path = tmp_path / "tiny.ts"
    export(gm, path, format="torchscript")
    loaded = torch.jit.load(str(path))
    x = torch.rand(2, 3, 11, 7, generator=torch.Generator().manual_seed(5)) * 1.3
    with torch.no_grad():
        assert torch.allclose(loaded(x), gm(x), rtol=0, atol=1e-6)


def test_torchscript_names_a_quantizer_whose_trace_freezes_the_example(tiny_sr, calib, tmp_path):
    gm = fxquant.compile(tiny_sr, "mse-w8a8-sym", calib=calib)
    quantizer = gm.get_submodule("blocks_0_0_input_quantizer")
    forward = quantizer.fake_quant
    # a quantizer reading a Python number off its input: the trace freezes the example's value
    quantizer.fake_quant = lambda x: forward(x) * float(x.shape[-1] % 2 + 1)
    with pytest.raises(ExportError, match="quantizer 'blocks_0_0_input_quantizer' \\(uniform: "
                                          "the trace computes something else"):
        export(gm, tmp_path / "x.ts", format="torchscript")
    assert not (tmp_path / "x.ts").exists()
