"""The ``ort_int8`` variant of ``fxquant bench``: fxquant's compiled model exported to ONNX
(:mod:`fxquant.deploy.onnx`, the ``integer`` form) and run by ONNX Runtime's CPU integer kernels,
timed beside the other variants in the same interleaved rounds."""

from __future__ import annotations

import torch
from torch import fx

from fxquant.bench_variants import Variant, VariantUnavailable
from fxquant.errors import FxquantError

NAME = "ort_int8"


def build_ort_int8(fake: fx.GraphModule, example: torch.Tensor) -> Variant:
    """ONNX Runtime (CPUExecutionProvider, ORT_ENABLE_ALL) on the ONNX export of ``fake``,
    with as many intra-op threads as torch uses; warmed once."""
    try:
        import onnxruntime
        from fxquant.deploy.ort import runner_for

        threads = torch.get_num_threads()
        runner = runner_for(fake, threads=threads)
        runner(example)
    except ImportError as exc:
        raise VariantUnavailable(NAME, f"onnxruntime is not installed ({exc}): "
                                       "pip install 'fxquant[deploy]'") from exc
    except FxquantError as exc:
        raise VariantUnavailable(NAME, str(exc).splitlines()[0]) from exc
    return Variant(NAME, runner, f"fxquant {fake.fxquant_recipe.name} exported to ONNX "
                                 f"(QLinearConv/ConvInteger), ONNX Runtime {onnxruntime.__version__} "
                                 f"CPU, ORT_ENABLE_ALL, {threads} intra-op threads")


class _Bound(torch.nn.Module):
    """``forward(x)`` of a model with bound Python arguments (CARN-M's ``scale``)."""

    def __init__(self, model: torch.nn.Module, concrete_args: dict):
        super().__init__()
        self.model, self.concrete_args = model, dict(concrete_args)

    def forward(self, x):
        return self.model(x, **self.concrete_args)


def build_ort_fp32(model: torch.nn.Module, example: torch.Tensor,
                   concrete_args: dict | None = None) -> Variant:
    """The float model exported by torch's ONNX exporter (opset 13, dynamic H/W) and run by
    ONNX Runtime like ``ort_int8``: ONNX Runtime's own float baseline."""
    import copy
    import io
    import warnings

    name = "ort_fp32"
    try:
        import onnxruntime
        from fxquant.deploy.ort import OrtRunner, session

        m = copy.deepcopy(model).eval()
        m = _Bound(m, concrete_args).eval() if concrete_args else m
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(m, (example,), buffer, dynamo=False, opset_version=13,
                              input_names=["lr"], dynamic_axes={"lr": {0: "n", 2: "h", 3: "w"}})
        threads = torch.get_num_threads()
        runner = OrtRunner(session(buffer.getvalue(), threads=threads))
        runner(example)
    except ImportError as exc:
        raise VariantUnavailable(name, f"onnxruntime is not installed ({exc}): "
                                       "pip install 'fxquant[deploy]'") from exc
    except Exception as exc:  # noqa: BLE001 - any exporter failure makes the variant unavailable
        raise VariantUnavailable(name, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return Variant(name, runner, f"float model exported to ONNX (opset 13), ONNX Runtime "
                                 f"{onnxruntime.__version__} CPU, ORT_ENABLE_ALL, {threads} intra-op threads")
