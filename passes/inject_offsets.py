"""``inject-offsets``: ODM's selective distribution offsets (fxquant/quant/offsets.py has the
module and the mismatch score, docs/methods/odm.md the choices)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.calibration import as_batches
from fxquant.errors import PassError
from fxquant.graph import module_of
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import QuantConv2d, Quantizer, UniformQuantizer
from fxquant.quant.offsets import OFFSET_KINDS, ChannelOffset, MismatchStats, quantizer_range
from fxquant.recipe import RecipeError, register_method

# Positively homogeneous activations: act(γx) = γ·act(x) for γ > 0, so a scale offset after
# one folds into the conv before it.
_HOMOGENEOUS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
_HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu, F.leaky_relu)


ODM_VERSIONS = ("v1", "v2")
COSINE_GRANULARITIES = ("global", "tensor")


@dataclass
class ODMOptions:
    """``[options]`` of ``method = "odm"``: what ``fxquant train`` adds to plain QAT.
    ``version`` v1 regularizes feature variance with sign-agreement gating (its offsets come
    from the ``inject-offsets`` pass in the pipeline); v2 regularizes the quantization
    mismatch weighted by (cos + 1)/2 (its weight grids from the ``wcc`` pass).
    ``reg_weight`` is λ (v2's paper: 1e-5; v1 gives none), ``granularity`` the cosine's
    (fxquant/train/odm.py)."""

    version: str = "v2"
    reg_weight: float = 1e-5
    granularity: str = "global"

    def validate(self, where: str = "options") -> None:
        if self.version not in ODM_VERSIONS:
            raise RecipeError(f"{where}.version: '{self.version}' is not valid; choose one of "
                              f"{', '.join(ODM_VERSIONS)}")
        if self.granularity not in COSINE_GRANULARITIES:
            raise RecipeError(f"{where}.granularity: '{self.granularity}' is not valid; choose "
                              f"one of {', '.join(COSINE_GRANULARITIES)}")
        if not self.reg_weight >= 0:
            raise RecipeError(f"{where}.reg_weight = {self.reg_weight} must be >= 0")


register_method("odm", ODMOptions, "trace,observe,calibrate,quantize,wcc,verify",
                "ODM: QAT start (v1: channel offsets where the mismatch is large; v2: "
                "weight-clipping correction); fxquant train adds the cooperative regularizer")


def _is_homogeneous(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target == "relu"
    return isinstance(module_of(gm, node), _HOMOGENEOUS_MODULES)


def fold_site(gm: fx.GraphModule, value: fx.Node, kind: str) -> tuple[fx.Node | None, str]:
    """The conv an offset on ``value`` folds into, or ``(None, why not)``.

    ``value`` must be the conv's output, through positively homogeneous activations only
    for a pure scale, each read by nothing else (the offset must change no other reader); a
    shift needs the conv directly and a bias to absorb it; a quantized conv needs a
    per-channel uniform weight grid (which scales with its weights)."""
    current = value
    through = 0
    while True:
        if len(current.users) != 1:
            return None, f"'{current.name}' is read by {len(current.users)} nodes"
        if isinstance(module_of(gm, current), nn.Identity):  # no-op: folds through for any kind
            current = current.args[0]
        elif _is_homogeneous(gm, current):
            through += 1
            current = current.args[0]
        else:
            break
        if not isinstance(current, fx.Node):
            return None, "an activation without a tensor input"
    conv = module_of(gm, current)
    if not isinstance(conv, nn.Conv2d):
        return None, f"produced by '{current.name}', not a conv"
    if through and kind != "scale":
        return None, "a shift cannot fold through an activation"
    if kind != "scale" and conv.bias is None:
        return None, f"conv '{current.name}' has no bias to absorb a shift"
    if isinstance(conv, QuantConv2d):
        wq = conv.weight_quantizer
        if not (isinstance(wq, UniformQuantizer) and wq.channels == conv.out_channels):
            return None, f"conv '{current.name}' has no per-channel uniform weight grid"
    return current, ""


@register_pass
@dataclass(frozen=True)
class InjectOffsetsPass(Pass):
    """Insert a learnable channel-wise offset in front of the static activation quantizers
    whose inputs mismatch their range most (ODM v1's selective distribution offsets)::

        c1 ──► relu ──► c2_input_quantizer ──► c2      c1 ──► relu ──► c2_input_offset
                                                  ──►          ──► c2_input_quantizer ──► c2

    Each candidate's mismatch score (fxquant/quant/offsets.py) is measured on the
    calibration data; layers with ``score >= threshold`` are chosen, at most ``top_k`` of
    them by score (0: no cap). Only sites that ``fold-offsets`` can fold into the conv that
    produces them are candidates, so the deployed graph has no extra op; the others are
    listed in ``ctx.state["offset_skipped"]`` with the reason. ``kind``: ``scale`` (default;
    folds through ReLU/LeakyReLU/PReLU), ``shift`` or ``both`` (conv directly, with bias).
    The offsets start at identity (the compiled model's outputs do not change) and are
    trained by QAT (``fxquant train``). The pipeline records the choice as ``sites=a;b;...``,
    so a saved or checkpointed model rebuilds the same offsets without calibration data.
    """

    name: ClassVar[str] = "inject-offsets"
    kind: str = "scale"
    threshold: float = 0.05
    top_k: int = 0
    sites: str = ""  # ";"-separated quantizer nodes: inject exactly there, no scoring

    def __post_init__(self):
        if self.kind not in OFFSET_KINDS:
            raise RecipeError(f"inject-offsets.kind: '{self.kind}' is not valid; choose one of "
                              f"{', '.join(OFFSET_KINDS)}")
        if not self.threshold >= 0:
            raise RecipeError(f"inject-offsets.threshold = {self.threshold} must be >= 0")
        if self.top_k < 0:
            raise RecipeError(f"inject-offsets.top_k = {self.top_k} must be >= 0 (0: no cap)")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        sites, skipped = self._candidates(gm)
        if self.sites:
            by_name = {n.name: n for n in sites}
            wanted = self.sites.split(";")
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise PassError(self.name, f"sites {missing} are not foldable offset sites of "
                                f"this graph; candidates: {', '.join(by_name) or 'none'}")
            chosen, scores = [by_name[w] for w in wanted], {}
        else:
            scores = self._scores(gm, sites, ctx) if sites else {}
            chosen = sorted((n for n in sites if scores[n.name] >= self.threshold),
                            key=lambda n: -scores[n.name])
            if self.top_k:
                chosen = chosen[:self.top_k]
        for node in chosen:
            channels = self._channels(gm, node)
            name = str(node.target).replace("_quantizer", "") + "_offset"
            name = name.replace(".", "_")
            gm.add_submodule(name, ChannelOffset(channels, self.kind))
            with gm.graph.inserting_before(node):
                offset = gm.graph.call_module(name, (node.args[0],))
            node.update_arg(0, offset)
        gm.recompile()
        ctx.state["offset_scores"] = scores
        ctx.state["offset_skipped"] = skipped
        names = [n.name for n in chosen]
        return PassResult(gm, bool(chosen), {
            "offsets": len(chosen), "candidates": len(sites), "not_foldable": len(skipped),
            "chosen": ", ".join(names),
            "max_score": round(max(scores.values()), 4) if scores else 0.0},
            resolved=replace(self, sites=";".join(names), threshold=0.0, top_k=0)
            if names and not self.sites else None)

    def _candidates(self, gm: fx.GraphModule) -> tuple[list[fx.Node], dict[str, str]]:
        sites, skipped = [], {}
        for node in gm.graph.nodes:
            module = module_of(gm, node)
            if not isinstance(module, Quantizer) or quantizer_range(module) is None \
                    or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            if getattr(module, "channels", None) is not None:
                skipped[node.name] = "per-channel activation ranges need no channel offset"
                continue
            conv, why = fold_site(gm, node.args[0], self.kind)
            if conv is None:
                skipped[node.name] = why
            else:
                sites.append(node)
        return sites, skipped

    @staticmethod
    def _channels(gm: fx.GraphModule, node: fx.Node) -> int:
        conv, _ = fold_site(gm, node.args[0], "scale")
        return module_of(gm, conv).out_channels

    @staticmethod
    def _scores(gm: fx.GraphModule, sites: list[fx.Node], ctx: PassContext) -> dict[str, float]:
        stats = {node.name: MismatchStats() for node in sites}
        handles = []
        for node in sites:
            module = gm.get_submodule(node.target)
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, s=stats[node.name]: s.add(args[0])))
        try:
            with torch.no_grad():
                for batch in as_batches(ctx.calib, ctx.recipe.calibration.batch_size):
                    gm(*batch)
        finally:
            for handle in handles:
                handle.remove()
        return {node.name: stats[node.name].score(quantizer_range(gm.get_submodule(node.target)))
                for node in sites}
