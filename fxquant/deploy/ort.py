"""Running exported ONNX models with ONNX Runtime: a session wrapped as a tensor → tensor
callable (what fxquant's evaluation and benchmarks take), and the node types of the graph
ONNX Runtime actually runs (its optimized model), to check that convs run as integer kernels."""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path

import torch
from torch import fx

from fxquant.deploy.errors import ExportError

OPTIMIZATIONS = ("all", "extended", "basic", "none")
INTEGER_CONVS = ("QLinearConv", "ConvInteger")
FLOAT_CONVS = ("Conv", "FusedConv")  # NCHWc convs keep the op type "Conv" (domain com.microsoft.nchwc)


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError("running ONNX models needs onnxruntime: pip install 'fxquant[deploy]'") from exc
    return onnxruntime


def session(model: str | os.PathLike | bytes, *, threads: int | None = None,
            optimization: str = "all", optimized_path: str | os.PathLike | None = None):
    """A CPUExecutionProvider InferenceSession of ``model`` (a path or serialized bytes);
    ``optimized_path`` saves the graph ONNX Runtime runs after its optimizations."""
    ort = _ort()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ExportError(f"ONNX Runtime optimization '{optimization}' unknown; valid: "
                          f"{', '.join(OPTIMIZATIONS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # the NCHWc serialization warning is expected
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OrtRunner:
    """``runner(x)``: the ONNX Runtime session's output for a float N×C×H×W tensor, as a tensor."""

    def __init__(self, sess):
        self.session = sess
        self.input_name = sess.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def node_counts(model) -> collections.Counter:
    """Op types of an ONNX model (a ModelProto or a path), main graph."""
    import onnx

    if not hasattr(model, "graph"):
        model = onnx.load(str(model))
    return collections.Counter(node.op_type for node in model.graph.node)


def runner_for(gm: fx.GraphModule | None, *, form: str = "integer", threads: int | None = None,
               optimization: str = "all", example_inputs: tuple | None = None) -> OrtRunner:
    """Export compiled model ``gm`` to a temporary ONNX file and wrap an ONNX Runtime session
    of it (the session keeps the model; the file is removed)."""
    from fxquant.deploy.onnx import export_onnx

    if gm is None:
        raise ExportError("the onnxruntime runtime runs a compiled model; give a static uniform "
                          "recipe (e.g. mse-w8a8-sym), not the float model")
    with tempfile.TemporaryDirectory(prefix="fxquant-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(gm, path, example_inputs, form=form)
        return OrtRunner(session(path, threads=threads, optimization=optimization))


def optimized_counts(model_bytes: bytes, *, optimization: str = "all") -> collections.Counter:
    """Node types of the graph ONNX Runtime runs for ``model_bytes`` (its optimized model,
    written to a temporary file and read back)."""
    with tempfile.TemporaryDirectory(prefix="fxquant-ort-") as folder:
        path = Path(folder) / "optimized.onnx"
        session(model_bytes, optimization=optimization, optimized_path=path)
        return node_counts(path)
