"""The model zoo: upstream SR architectures with upstream state_dict key names.

``available_models()`` lists the zoo, ``get_spec(name)`` describes one network (scales, colour
convention, pretrained files under ``<data>/weights``, the Set5 PSNR-Y those files reproduce),
and ``build_model(name, scale, ...)`` returns it in ``eval()`` mode, optionally with weights.
Every network traces with ``torch.fx.symbolic_trace`` (CARN-M with ``concrete_args={"scale": s}``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from fxquant.errors import CheckpointError, DataError, FxquantError
from fxquant.models.carn_m import Net as CARNM
from fxquant.models.checkpoint import load_checkpoint, read_state_dict
from fxquant.models.edsr import EDSR, EDSRBaseline
from fxquant.models.fsrcnn import FSRCNN
from fxquant.models.imdn import IMDN
from fxquant.models.pan import PAN
from fxquant.models.rdn import RDN
from fxquant.models.srresnet import SRResNet
from fxquant.paths import weights_path

__all__ = [
    "ModelSpec", "available_models", "get_spec", "build_model", "load_checkpoint", "read_state_dict",
    "IMDN", "PAN", "CARNM", "FSRCNN", "EDSR", "EDSRBaseline", "RDN", "SRResNet",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    scales: tuple[int, ...]
    color: str
    takes_scale: bool
    weight_files: dict = field(default_factory=dict)
    published_set5: dict = field(default_factory=dict)
    description: str = ""

    @property
    def channels(self) -> int:
        """Input channels: 1 for a luma (``y``) model, 3 for RGB."""
        return 1 if self.color == "y" else 3


_SPECS: dict[str, ModelSpec] = {
    "imdn": ModelSpec(
        "imdn", (2, 3, 4), "rgb", False,
        {2: "IMDN_x2.pth", 3: "IMDN_x3.pth", 4: "IMDN_x4.pth"},
        {2: 37.996, 3: 34.360, 4: 32.210},
        "IMDN nf=64, 6 IMD modules (Zheng222/IMDN model/architecture.py)"),
    "pan": ModelSpec(
        "pan", (2, 3, 4), "rgb", False,
        {2: "PANx2_DF2K.pth", 3: "PANx3_DF2K.pth", 4: "PANx4_DF2K.pth"},
        {2: 38.001, 3: 34.400, 4: 32.131},
        "PAN nf=40 unf=24 nb=16 (zhaohengyuan1/PAN codes/models/archs/PAN_arch.py)"),
    "carn_m": ModelSpec(
        "carn_m", (2, 3, 4), "rgb", True,
        {2: "carn_m.pth", 3: "carn_m.pth", 4: "carn_m.pth"},
        {2: 37.678, 3: 34.058, 4: 31.883},
        "CARN-M multi-scale, group=4, forward(x, scale) (nmhkahn/CARN-pytorch carn/model/carn_m.py)"),
    "fsrcnn": ModelSpec(
        "fsrcnn", (2, 3, 4), "y", False,
        {2: "fsrcnn_x2.pth", 3: "fsrcnn_x3.pth", 4: "fsrcnn_x4.pth"},
        {2: 37.100, 3: 32.587, 4: 30.505},
        "FSRCNN d=56 s=12 m=4 on the Y channel (yjn870/FSRCNN-pytorch models.py)"),
    "edsr": ModelSpec(
        "edsr", (2, 3, 4), "rgb", False, {}, {},
        "EDSR r32f256 res_scale=0.1 (sanghyun-son/EDSR-PyTorch src/model/edsr.py)"),
    "edsr_baseline": ModelSpec(
        "edsr_baseline", (2, 3, 4), "rgb", False, {}, {},
        "EDSR-baseline r16f64 res_scale=1 (sanghyun-son/EDSR-PyTorch src/model/edsr.py)"),
    "rdn": ModelSpec(
        "rdn", (2, 3, 4), "rgb", False, {}, {},
        "RDN config B: G0=64 D=16 C=8 G=64 (sanghyun-son/EDSR-PyTorch src/model/rdn.py)"),
    "srresnet": ModelSpec(
        "srresnet", (2, 3, 4), "rgb", False, {}, {},
        "SRResNet with BN, 16 blocks, 64 features (Cheeun/DAQ-pytorch src/model/srresnet.py)"),
}

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "imdn": lambda s: IMDN(in_nc=3, nf=64, num_modules=6, out_nc=3, upscale=s),
    "pan": lambda s: PAN(in_nc=3, out_nc=3, nf=40, unf=24, nb=16, scale=s),
    "carn_m": lambda s: CARNM(multi_scale=True, group=4),
    "fsrcnn": lambda s: FSRCNN(scale_factor=s),
    "edsr": lambda s: EDSR(scale=s),
    "edsr_baseline": lambda s: EDSRBaseline(scale=s),
    "rdn": lambda s: RDN(scale=s),
    "srresnet": lambda s: SRResNet(scale=s),
}


def available_models() -> list[str]:
    """Names of the zoo's networks."""
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; :class:`FxquantError` listing the zoo if unknown."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise FxquantError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def build_model(name: str, scale: int, *, pretrained: bool = False,
                checkpoint: str | os.PathLike | None = None,
                data_root: str | os.PathLike | None = None) -> nn.Module:
    """Build zoo network ``name`` for ``scale`` in ``eval()`` mode.

    ``pretrained=True`` loads ``spec.weight_files[scale]`` from ``<data_root>/weights`` (data root
    from ``data_root`` or ``FXQUANT_DATA``); ``checkpoint=PATH`` loads a user's checkpoint instead.
    """
    spec = get_spec(name)
    if isinstance(scale, bool) or scale not in spec.scales:
        raise FxquantError(f"model {name!r} does not support scale {scale!r}; "
                           f"valid scales: {', '.join(str(s) for s in spec.scales)}")
    if pretrained and checkpoint is not None:
        raise FxquantError("pass either pretrained=True or checkpoint=PATH, not both")
    if pretrained and scale not in spec.weight_files:
        raise DataError(f"no pretrained weights are available for {name!r} x{scale}; "
                        f"pass checkpoint=PATH to load your own")
    model = _BUILDERS[name](scale)
    path = None
    if pretrained:
        path = weights_path(spec.weight_files[scale], data_root)
    elif checkpoint is not None:
        path = checkpoint
    if path is not None:
        try:
            load_checkpoint(model, path)
        except CheckpointError as exc:
            raise CheckpointError(f"{name} x{scale}: {exc}") from exc
    return model.eval()
