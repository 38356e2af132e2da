"""Deployment formats for compiled models: ONNX (run by ONNX Runtime's integer kernels) and
``torch.export`` ExportedPrograms.

    fxquant.export(gm, "model.onnx", format="onnx", example_inputs=(lr,))
    fxquant.export(gm, "model.pt2", format="torch-export")
    fxquant.export(gm, "model.ts", format="torchscript")

docs/deploy.md describes both formats, what each quantizer becomes, and what cannot export.
"""

from __future__ import annotations

import os

from torch import fx

from fxquant.deploy.errors import ExportError

FORMATS = ("onnx", "torch-export", "torchscript")


def export(gm: fx.GraphModule, path: str | os.PathLike, format: str = "onnx",
           example_inputs: tuple | None = None, **options):
    """Write compiled model ``gm`` to ``path`` in ``format`` (``onnx`` or ``torch-export``).

    ``example_inputs`` (a tuple with one N×C×H×W image batch) fixes the traced shapes; height
    and width stay dynamic. ``options``: for ``onnx``, ``form`` (``integer``, the default,
    ``qdq`` or ``fake-quant``) and ``opset``; for ``torch-export``, ``target`` (``fake-quant``, the default,
    ``reference`` or ``cpu``); ``torchscript`` (a checked ``torch.jit.trace``) takes ``target``
    too. Returns the ONNX ModelProto, ExportedProgram or ScriptModule written."""
    if format == "onnx":
        from fxquant.deploy.onnx import export_onnx
        return export_onnx(gm, path, example_inputs, **options)
    if format == "torch-export":
        from fxquant.deploy.torch_export import export_program
        return export_program(gm, path, example_inputs, **options)
    if format == "torchscript":
        from fxquant.deploy.torch_export import export_torchscript
        return export_torchscript(gm, path, example_inputs, **options)
    raise ExportError(f"export format '{format}' unknown; valid: {', '.join(FORMATS)}")


__all__ = ["ExportError", "FORMATS", "export"]
