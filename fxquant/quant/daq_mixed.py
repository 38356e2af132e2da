"""DAQ channel-sensitivity mixed precision: per-input-channel output errors of each conv at
every candidate bit-width and the (optionally downstream-weighted) sensitivity observer
(docs/methods/daq.md §5). The bit allocation from these errors is in
:mod:`fxquant.quant.daq_bit_allocation`."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from fxquant.observers import Observer
from fxquant.quant.daq import daq_quantize
from fxquant.quant.daq_weights import daq_weight_quantize
from fxquant.quant.layers import conv_input_pads, pad_like


def channel_weight_vectors(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """C_in × (O/g) × (k·k): the weights that input channel ``c`` feeds (its group's outputs)."""
    out_channels, per_group = weight.shape[:2]
    o_g = out_channels // groups
    w = weight.reshape(groups, o_g, per_group, -1).permute(0, 2, 1, 3)
    return w.reshape(groups * per_group, o_g, -1)


def channel_output_errors(x: torch.Tensor, weight: torch.Tensor, bits_choices: Sequence[int], *,
                          groups: int = 1, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                          padding_mode: str = "zeros",
                          branch: str = "signed", qq_bits: int = 0, step_index: str = "head",
                          weight_mode: str = "match", weight_bits: int = 4,
                          weight_granularity: str = "per-tensor",
                          weight_step_index: str = "head", measure: str = "output",
                          output_gains: torch.Tensor | None = None,
                          dc_gains: torch.Tensor | None = None,
                          max_positions: int = 4096) -> torch.Tensor:
    """Squared conv-output error when only channel ``c`` is quantized at ``b`` bits.

    Returns an ``len(bits_choices) × C_in`` float64 tensor ``E[b, c] = ||y_b^(c) − y||²``
    (summed over the batch), where ``y_b^(c)`` is the conv output (bias excluded) with the
    activation channel ``c`` DAQ-quantized at ``b`` bits and, with ``weight_mode = "match"``,
    its weight slice ``W[:, c]`` too (``"fixed"``: weights at ``weight_bits`` for all channels,
    so only the activation error depends on ``b``).

    Exact without running C convolutions: with ``z_c`` the k×k patches of the channel's
    error (stacked with the patches of ``x_c`` in match mode) and ``V_c`` the weights the
    channel feeds, ``E = Σ_ij (V_cᵀ V_c)_ij · (Σ_p z_c z_cᵀ)_ij`` (a Gram trick, computed
    block-wise). The sum
    over output positions ``p`` is exact up to ``max_positions`` positions per call and
    otherwise a uniform random sample of that many (fixed seed), rescaled. ``measure = "input"`` returns the
    plain activation error ``Σ (x̂_c − x_c)²`` instead (ignores the weights).
    ``padding``: (rows, columns) on both sides, or a conv's four pads (left, right, top,
    bottom), with zeros or ``padding_mode`` as the conv pads.
    ``output_gains`` (length O) weights each output channel's squared error, e.g. by
    :func:`downstream_gains`, so that ``E`` estimates the error at the network output;
    with ``dc_gains`` the error's per-image spatial mean (DC) is weighted by those instead
    (a spatially constant error propagates differently from a white one).
    """
    x = x.detach().float()
    weight = weight.detach().float()
    n, c_in = x.shape[:2]
    geometry = (tuple(weight.shape[2:]), tuple(stride), _pads(padding), tuple(dilation),
                padding_mode)
    sample = None if measure == "input" else _sample_positions(x.shape, geometry, max_positions)
    results = []
    if weight_mode == "fixed":
        fixed_w = daq_weight_quantize(weight, weight_bits, granularity=weight_granularity,
                                      step_index=weight_step_index)
    x_patches = None
    for bits in bits_choices:
        err = daq_quantize(x, bits, branch=branch, qq_bits=qq_bits, step_index=step_index) - x
        if measure == "input":
            results.append(err.double().pow(2).sum(dim=(0, 2, 3)))
            continue
        index, scale = sample
        z = _patches(err, geometry, index)  # C × k² × P
        r_ee = torch.bmm(z, z.transpose(1, 2)).double()
        if weight_mode == "match":
            # ŷ − y = Ŵ⋆e + (Ŵ − W)⋆x: the Gram of [e; x] against that of [Ŵ; Ŵ − W]
            w_hat = daq_weight_quantize(weight, bits, granularity=weight_granularity,
                                        step_index=weight_step_index)
            if x_patches is None:
                x_patches = _patches(x, geometry, index)
                r_xx = torch.bmm(x_patches, x_patches.transpose(1, 2)).double()
            v_hat = channel_weight_vectors(_weighted(w_hat, output_gains), groups).double()
            v_err = channel_weight_vectors(_weighted(w_hat - weight, output_gains),
                                           groups).double()
            r_ex = torch.bmm(z, x_patches.transpose(1, 2)).double()
            energy = ((v_hat.transpose(1, 2) @ v_hat) * r_ee).sum(dim=(1, 2)) \
                + 2 * ((v_hat.transpose(1, 2) @ v_err) * r_ex).sum(dim=(1, 2)) \
                + ((v_err.transpose(1, 2) @ v_err) * r_xx).sum(dim=(1, 2))
        else:
            v = channel_weight_vectors(_weighted(fixed_w, output_gains), groups).double()
            energy = ((v.transpose(1, 2) @ v) * r_ee).sum(dim=(1, 2))
        energy = energy * scale
        if output_gains is not None and dc_gains is not None:
            energy = energy + _dc_correction(err, x, weight, w_hat if weight_mode == "match"
                                             else fixed_w, weight_mode, groups, output_gains,
                                             dc_gains, positions=index[0].numel() * scale / n)
        results.append(energy)
    return torch.stack(results)


def _dc_correction(err, x, weight, w_hat, weight_mode, groups, gains, dc_gains, positions):
    """``Σ_o (g_dc − g)_o · D_o,c``: re-weight the DC part ``D`` of each channel's output error.

    The DC of channel ``c``'s error at output ``o`` in image ``n`` is (borders ignored)
    ``a = (ΣŴ_o,c)·mean(e_n,c) + (Σ(Ŵ − W)_o,c)·mean(x_n,c)``; ``D = positions·Σ_n a²``.
    """
    e_mean = err.double().mean(dim=(2, 3))  # N × C
    a = e_mean[:, :, None] * channel_weight_vectors(w_hat, groups).double().sum(-1)[None]
    if weight_mode == "match":
        x_mean = x.double().mean(dim=(2, 3))
        a = a + x_mean[:, :, None] * channel_weight_vectors(w_hat - weight, groups).double().sum(-1)[None]
    dc_energy = positions * a.pow(2).sum(0)  # C × O/g
    delta = (dc_gains.double() - gains.double()).reshape(-1, 1, 1, 1).to(dc_energy.device)
    delta = delta.expand(-1, weight.shape[1], 1, 1)
    per_output = channel_weight_vectors(delta, groups)[..., 0]  # C × O/g: the gains c feeds
    return (per_output * dc_energy).sum(dim=1)


def _weighted(weight: torch.Tensor, gains: torch.Tensor | None) -> torch.Tensor:
    """Scale output channel ``o`` by ``sqrt(gains[o])`` (squared errors then carry ``gains``)."""
    if gains is None:
        return weight
    gains = gains.to(device=weight.device, dtype=weight.dtype)
    return weight * gains.clamp(min=0).sqrt().reshape(-1, 1, 1, 1)


def downstream_gains(gm: torch.fx.GraphModule, nodes: Sequence[torch.fx.Node], batches,
                     probes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """How much a perturbation of each output channel of each node reaches the network output.

    For node output ``z`` and network output ``y``, ``g_o = E_p E_v[(∂(vᵀy)/∂z_{o,p})²]``
    with ``v ~ N(0, I)`` (Hutchinson's estimate of the diagonal of ``JᵀJ``, averaged over
    positions ``p`` and calibration batches): a white error of energy ``ε`` on channel ``o``
    adds about ``g_o·ε`` to the squared error of ``y``. The second gain is the same for a
    spatially constant error: ``g_dc,o = E_v[(Σ_p ∂(vᵀy)/∂z_{o,p})²] / P``. Returns
    ``{node name: (g, g_dc)}``; the float network runs forward and backward ``probes``
    times per batch.
    """
    wanted = {n.name for n in nodes}
    generator = torch.Generator().manual_seed(seed)
    gains: dict[str, torch.Tensor] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted:
                captured[node.name] = out
            return out

    was_training = gm.training
    gm.eval()
    for batch in batches:
        for _ in range(probes):
            captured: dict[str, torch.Tensor] = {}
            with torch.enable_grad():
                inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in batch]
                out = Capture(gm).run(*inputs)
                out = out[0] if isinstance(out, (tuple, list)) else out
                v = torch.randn(out.shape, generator=generator, dtype=out.dtype).to(out.device)
                names = [n for n in captured if captured[n].requires_grad]
                grads = torch.autograd.grad((out * v).sum(), [captured[n] for n in names],
                                            allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is None:
                    continue
                grad = grad.detach().double().cpu()
                white = grad.pow(2).mean(dim=(0, 2, 3))
                dc = grad.sum(dim=(2, 3)).pow(2).mean(0) / (grad.shape[2] * grad.shape[3])
                old = gains.get(name)
                gains[name] = (white, dc) if old is None else (old[0] + white, old[1] + dc)
    gm.train(was_training)
    count = max(len(batches) * probes, 1)
    return {name: (w / count, d / count) for name, (w, d) in gains.items()}


def _pads(padding) -> tuple[int, int, int, int]:
    """``F.pad``'s (left, right, top, bottom) of ``padding``: (rows, columns) on both sides,
    or those four already (a conv's pads, :func:`~fxquant.quant.layers.conv_input_pads`)."""
    padding = tuple(int(p) for p in padding)
    return padding if len(padding) == 4 else (padding[1], padding[1], padding[0], padding[0])


def _sample_positions(shape, geometry, max_positions: int):
    """Output positions (n, i, j) to evaluate: all of them, or ``max_positions`` drawn
    uniformly (fixed seed), with the factor that rescales sums to all positions."""
    n, _, h, w = shape
    kernel, stride, pads, dilation, _ = geometry
    left, right, top, bottom = pads
    ho = (h + top + bottom - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w + left + right - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    total = n * ho * wo
    if total <= max_positions:
        flat = torch.arange(total)
    else:
        flat = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:max_positions]
    index = (flat // (ho * wo), (flat // wo) % ho, flat % wo)
    return index, total / flat.numel()


def _patches(t: torch.Tensor, geometry, index) -> torch.Tensor:
    """The k×k input patches of ``t`` at output positions ``index``: C × k² × P, ``t``
    padded as the conv pads its input (a DAQ error of a reflected value is the reflected
    error: the statistics are per (image, channel))."""
    kernel, stride, pads, dilation, mode = geometry
    padded = pad_like(t, pads, mode)
    n_idx, i_idx, j_idx = index
    rows = i_idx[None, :] * stride[0] + (torch.arange(kernel[0]) * dilation[0])[:, None]
    cols = j_idx[None, :] * stride[1] + (torch.arange(kernel[1]) * dilation[1])[:, None]
    _, _, hp, wp = padded.shape
    linear = (n_idx[None, None, :] * hp + rows[:, None, :]) * wp + cols[None, :, :]  # kh×kw×P
    linear = linear.to(t.device)
    flat = padded.transpose(0, 1).reshape(t.shape[1], -1)  # C × (N·Hp·Wp)
    return flat.index_select(1, linear.reshape(-1)).reshape(t.shape[1], kernel[0] * kernel[1], -1)


class DAQSensitivityObserver(Observer):
    """Identity module that accumulates, for one conv input, the output errors
    ``E[b, c]`` of :func:`channel_output_errors` over the calibration batches (weighted by
    ``output_gains`` when given), and the conv's output energy ``Σ y²``."""

    kind = "daq-sensitivity"

    def __init__(self, node_name: str, conv: torch.nn.Conv2d, bits_choices: Sequence[int], *,
                 branch: str = "signed", qq_bits: int = 0, step_index: str = "head",
                 weight_mode: str = "match", weight_bits: int = 4,
                 weight_granularity: str = "per-tensor", weight_step_index: str = "head",
                 measure: str = "output", output_gains: torch.Tensor | None = None,
                 dc_gains: torch.Tensor | None = None, max_positions: int = 4096):
        super().__init__(node_name)
        self.bits_choices = tuple(int(b) for b in bits_choices)
        self.branch = branch
        self.geometry = dict(groups=conv.groups, stride=tuple(conv.stride),
                             dilation=tuple(conv.dilation), padding=conv_input_pads(conv),
                             padding_mode=conv.padding_mode)
        self.options = dict(branch=branch, qq_bits=qq_bits, step_index=step_index,
                            weight_mode=weight_mode, weight_bits=weight_bits,
                            weight_granularity=weight_granularity,
                            weight_step_index=weight_step_index, measure=measure,
                            max_positions=max_positions)
        # Transient copies: the observer is removed by the daq pass.
        self.register_buffer("weight", conv.weight.detach().clone(), persistent=False)
        for name, gains in (("output_gains", output_gains), ("dc_gains", dc_gains)):
            self.register_buffer(name, None if gains is None else gains.detach().double().clone(),
                                 persistent=False)
        self.errors: torch.Tensor | None = None
        self.output_energy = 0.0
        self.macs_per_channel = 0

    def observe(self, x: torch.Tensor) -> None:
        errors = channel_output_errors(x, self.weight, self.bits_choices, **self.geometry,
                                       output_gains=self.output_gains, dc_gains=self.dc_gains,
                                       **self.options)
        errors = errors.cpu()
        self.errors = errors if self.errors is None else self.errors + errors
        y = F.conv2d(pad_like(x, self.geometry["padding"], self.geometry["padding_mode"]),
                     self.weight, None, self.geometry["stride"], 0, self.geometry["dilation"],
                     self.geometry["groups"])
        self.output_energy += float(y.double().pow(2).sum())
        # multiply-accumulates per image that each input channel feeds (for bit budgets per MAC)
        self.macs_per_channel = (self.weight.shape[0] // self.geometry["groups"]) \
            * self.weight.shape[2] * self.weight.shape[3] * y.shape[2] * y.shape[3]

    def describe(self) -> dict:
        return {"kind": self.kind, "mode": "observer", "batches": self.batches,
                "bits": "/".join(map(str, self.bits_choices))}
