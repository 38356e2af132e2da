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
