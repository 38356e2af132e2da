"""DAQ quantizer math: properties with hypothesis, the official formulas, STE gradients,
the channel-sensitivity measure and the mixed-precision bit allocation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fxquant.quant.daq import (
    GAUSSIAN_STEPS,
    DAQActivationQuantizer,
    daq_quantize,
    quantize_sigma,
    relu_stats,
    signed_stats,
    step_for_bits,
)
from fxquant.quant.daq_weights import DAQWeightQuantizer, daq_weight_quantize
from fxquant.quant.daq_bit_allocation import allocate_bits, channel_sensitivity
from fxquant.quant.daq_mixed import channel_output_errors
from fxquant.quant.layers import conv_input_pads

pytestmark = pytest.mark.usefixtures("one_thread")


bits_st = st.integers(2, 8)
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
shape_st = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 5), st.integers(2, 6))


def _tensor(draw, shape, lo=-100.0, hi=100.0, dtype=torch.float64):
    n = shape[0] * shape[1] * shape[2] * shape[3]
    values = draw(st.lists(st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32),
                           min_size=n, max_size=n))
    return torch.tensor(values, dtype=dtype).reshape(shape)


@st.composite
def activations(draw, lo=-100.0, hi=100.0, dtype=torch.float64):
    return _tensor(draw, draw(shape_st), lo, hi, dtype)


def _levels_per_channel(q: torch.Tensor) -> list[int]:
    flat = q.reshape(q.shape[0] * q.shape[1], -1)
    return [torch.unique(row).numel() for row in flat]


# ----------------------------------------------------------------------------- table, formulas
def test_step_table_and_indexing():
    assert step_for_bits(2) == 1.596 and step_for_bits(4) == 0.586      # HEAD: table[b − 1]
    assert step_for_bits(2, "initial") == 0.996 and step_for_bits(4, "initial") == 0.335
    assert GAUSSIAN_STEPS[1] == 1.596 and GAUSSIAN_STEPS[8] == 0.031
    with pytest.raises(ValueError, match="2..8"):
        step_for_bits(9)


def test_signed_branch_is_the_official_formula():
    x = torch.randn(2, 3, 7, 5, dtype=torch.float64) * 3 + 1
    b = 3
    sigma, mu = torch.std_mean(x, dim=(2, 3), keepdim=True)
    delta = step_for_bits(b) * sigma
    t = (2 ** b / 2 - 0.5) * delta
    expected = mu + torch.clamp((torch.round((x - mu) / delta + 0.5) - 0.5) * delta, -t, t)
    assert torch.allclose(daq_quantize(x, b), expected, rtol=0, atol=1e-12)
    # mid-rise: exactly 2^b levels, symmetric about μ, none at μ
    spread = torch.cat([torch.zeros(4000), torch.linspace(-50, 50, 1001)]).double()
    q = daq_quantize(spread.reshape(1, 1, 1, -1), b)
    levels = torch.unique(q)
    assert levels.numel() == 2 ** b
    assert not torch.isclose(levels, torch.tensor(0.0, dtype=torch.float64), atol=1e-9).any()


def test_post_relu_head_branch_is_unclipped_uniform_grid():
    x = torch.relu(torch.randn(2, 4, 9, 9, dtype=torch.float64)) * 5
    x[0, 0, 0, 0] = 1e3  # an outlier is kept (no upper clip at HEAD)
    b = 2
    n = (x > 0).sum(dim=(2, 3), keepdim=True) + 1
    mu = x.sum(dim=(2, 3), keepdim=True) / n
    sigma = torch.sqrt((x * x).sum(dim=(2, 3), keepdim=True) / n - mu * mu)
    delta = step_for_bits(b) * sigma
    t = (2 ** b / 2 - 0.5) * delta
    literal = t + (torch.round((x - t) / delta + 0.5) - 0.5) * delta  # HEAD, clamps commented out
    q = daq_quantize(x, b, branch="relu")
    assert torch.allclose(q, literal, rtol=0, atol=1e-9)
    assert torch.allclose(q, torch.round(x / delta) * delta, atol=1e-9)  # no ties in random data
    assert (q > t).any()  # beyond the signed branch's clip: the outlier survives


def test_post_relu_clipped_and_initial_variants():
    x = torch.relu(torch.randn(2, 4, 9, 9, dtype=torch.float64)) * 5
    x[0, 0, 0, 0] = 1e3
    mu, sigma = relu_stats(x)
    for b in (2, 4):
        delta = step_for_bits(b) * sigma
        clipped = daq_quantize(x, b, branch="relu-clipped")
        assert max(_levels_per_channel(clipped)) <= 2 ** b
        assert (clipped >= 0).all() and (clipped <= (2 ** b - 1) * delta * (1 + 1e-9)).all()
        assert (clipped[x == 0] == 0).all()  # zero is a level
        t = (2 ** b / 2 - 0.5) * delta
        initial = daq_quantize(x, b, branch="relu-initial")
        assert (initial >= -1e-12).all()
        assert (initial <= torch.maximum(mu + t, 2 * t) * (1 + 1e-9)).all()


def test_sigma_quantization_has_at_most_2_to_qq_levels_per_image():
    sigma = torch.rand(3, 64, 1, 1, dtype=torch.float64) * 2
    for qq in (2, 3, 4):
        q = quantize_sigma(sigma, qq)
        for n in range(3):
            assert torch.unique(q[n]).numel() <= 2 ** qq
    same = torch.full((1, 8, 1, 1), 0.7, dtype=torch.float64)
    assert torch.equal(quantize_sigma(same, 4), same)  # Δσ = 0: σ' = mean


def test_per_channel_bits_equal_per_channel_scalar_runs():
    x = torch.randn(2, 5, 6, 6) * torch.arange(1, 6).reshape(1, 5, 1, 1)
    bits = torch.tensor([2, 3, 4, 8, 3])
    for branch in ("signed", "relu", "relu-clipped", "relu-initial"):
        xin = x if branch == "signed" else x.relu()
        vector = daq_quantize(xin, bits, branch=branch)
        for c, b in enumerate(bits.tolist()):
            single = daq_quantize(xin, b, branch=branch)
            assert torch.allclose(vector[:, c], single[:, c], atol=1e-6)


def test_one_pixel_maps_have_no_spread_and_pass_unchanged():
    x = torch.randn(2, 4, 1, 1)  # e.g. IMDN's channel attention after global pooling
    assert torch.equal(daq_quantize(x, 4), x)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(activations(), bits_st)
def test_signed_branch_has_at_most_2_to_the_b_levels_per_image_channel(x, b):
    assert max(_levels_per_channel(daq_quantize(x, b))) <= 2 ** b


@settings(max_examples=150, deadline=None)
@given(activations(lo=0.0), bits_st)
def test_clipped_post_relu_has_at_most_2_to_the_b_levels_per_image_channel(x, b):
    assert max(_levels_per_channel(daq_quantize(x, b, branch="relu-clipped"))) <= 2 ** b


@settings(max_examples=100, deadline=None)
@given(activations(), st.lists(bits_st, min_size=3, max_size=3))
def test_per_channel_bits_bound_the_levels_of_each_channel(x, bits):
    bits = torch.tensor(bits[: x.shape[1]])
    q = daq_quantize(x, bits)
    for c in range(x.shape[1]):
        for n in range(x.shape[0]):
            assert torch.unique(q[n, c]).numel() <= 2 ** int(bits[c])


@settings(max_examples=150, deadline=None)
@given(activations(), bits_st, st.data())
def test_signed_branch_is_per_channel_affine_equivariant(x, b, data):
    c = x.shape[1]
    a = torch.tensor(data.draw(st.lists(st.floats(0.01, 100.0), min_size=c, max_size=c)),
                     dtype=torch.float64).reshape(1, c, 1, 1)
    shift = torch.tensor(data.draw(st.lists(st.floats(-100.0, 100.0), min_size=c, max_size=c)),
                         dtype=torch.float64).reshape(1, c, 1, 1)
    q = daq_quantize(x, b)
    q_affine = daq_quantize(a * x + shift, b)
    diff = (q_affine - (a * q + shift)).abs()
    scale = (a * x.abs().amax(dim=(2, 3), keepdim=True) + shift.abs() + 1.0)
    tol = 1e-9 * scale
    # Float error may move a value that lies on a rounding tie to the neighbouring level.
    mu, sigma = signed_stats(x)
    delta = step_for_bits(b) * sigma
    z = (x - mu) / torch.where(delta > 0, delta, torch.ones_like(delta)) + 0.5
    near_tie = ((z - torch.floor(z)) - 0.5).abs() < 1e-6
    one_step = (a * delta).expand_as(x) * (1 + 1e-6) + tol
    assert ((diff <= tol) | (near_tie & (diff <= one_step))).all()


@settings(max_examples=100, deadline=None)
@given(shape_st, st.floats(-1e6, 1e6, allow_nan=False, width=32), bits_st,
       st.integers(0, 2 ** 16), st.sampled_from([0, 4]))
def test_constant_channels_map_to_their_mean(shape, value, b, seed, qq):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = value
    q = daq_quantize(x, b, qq_bits=qq)
    assert torch.allclose(q[:, 0], torch.full_like(q[:, 0], value), rtol=1e-9, atol=1e-9)
    zeros = torch.zeros(shape, dtype=torch.float64)
    for branch in ("relu", "relu-clipped", "relu-initial"):
        assert torch.equal(daq_quantize(zeros, b, branch=branch, qq_bits=qq), zeros)


@settings(max_examples=200, deadline=None)
@given(activations(lo=-FLOAT32_MAX, hi=FLOAT32_MAX, dtype=torch.float32), bits_st,
       st.sampled_from(["signed", "relu", "relu-clipped", "relu-initial"]),
       st.sampled_from([0, 2, 4]))
def test_output_is_finite_for_any_finite_input(x, b, branch, qq):
    if branch != "signed":
        x = x.abs()
    assert torch.isfinite(daq_quantize(x, b, branch=branch, qq_bits=qq)).all()


@settings(max_examples=100, deadline=None)
@given(activations(lo=-1.0, hi=1.0, dtype=torch.float32), bits_st,
       st.sampled_from(["per-tensor", "per-channel"]))
def test_weights_have_at_most_2_to_the_b_symmetric_levels(w, b, granularity):
    q = daq_weight_quantize(w, b, granularity=granularity)
    assert torch.isfinite(q).all()
    rows = q.reshape(q.shape[0], -1) if granularity == "per-channel" else q.reshape(1, -1)
    for row in rows:
        assert torch.unique(row).numel() <= 2 ** b
    # mid-rise levels (k − 0.5)·Δ: none at zero, unless a channel is constant, or so small
    # (subnormal, below float32's smallest normal) that half its step rounds to zero
    rows = w.reshape(w.shape[0], -1)
    assert (q != 0).all() or (w == 0).all() or (rows.std(1) == 0).any() \
        or (rows.abs().amax(1) < torch.finfo(torch.float32).tiny).any()


# ----------------------------------------------------------------------------- modules, STE
def test_activation_quantizer_describe_and_identity_gradient():
    quant = DAQActivationQuantizer(4, 3)
    info = quant.describe()
    assert info["kind"] == "daq" and info["bits"] == 3
    assert info["granularity"] == "per-image-channel" and info["mode"] == "dynamic"
    quant.set_bits(torch.tensor([2, 3, 3, 4]))
    assert quant.describe()["bits"] == "2-4 (avg 3.0)"
    x = (torch.randn(2, 4, 6, 6) * 4).requires_grad_()
    upstream = torch.randn(2, 4, 6, 6)
    (quant(x) * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)  # identity: no clipping mask
    with pytest.raises(ValueError, match="2..8"):
        quant.set_bits(9)


def test_weight_quantizer_gradient_reaches_the_weight():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    quant = DAQWeightQuantizer(conv.weight.shape, 3)
    assert quant.describe() == {"kind": "daq", "bits": 3, "granularity": "per-tensor",
                                "mode": "static"}
    w_hat = quant(conv.weight)
    assert torch.unique(w_hat.detach()).numel() <= 8
    x = torch.randn(2, 4, 5, 5)
    F.conv2d(x, w_hat, conv.bias, padding=1).square().sum().backward()
    leaf = w_hat.detach().requires_grad_()
    F.conv2d(x, leaf, conv.bias, padding=1).square().sum().backward()
    assert torch.allclose(conv.weight.grad, leaf.grad)  # straight through, no mask
    assert conv.weight.grad.abs().sum() > 0


def test_weight_bits_follow_the_input_channel_in_grouped_convs():
    conv = torch.nn.Conv2d(8, 12, 3, groups=2)
    quant = DAQWeightQuantizer(conv.weight.shape, 4, groups=2)
    channel_bits = torch.tensor([2, 3, 4, 5, 6, 7, 8, 2])
    quant.set_bits(channel_bits)
    # output channels 0..5 read input channels 0..3, 6..11 read 4..7
    assert quant.bits[0, :, 0, 0].tolist() == [2, 3, 4, 5]
    assert quant.bits[11, :, 0, 0].tolist() == [6, 7, 8, 2]


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("groups, kernel, mode, padding_mode", [
    (1, 3, "match", "zeros"), (2, 3, "match", "zeros"), (1, 1, "fixed", "zeros"),
    (2, 3, "fixed", "zeros"), (1, 3, "match", "reflect"), (2, 3, "fixed", "circular"),
    (1, 4, "match", "zeros")])  # 4×4 'same': one more row and column on the bottom/right
def test_channel_output_errors_equal_brute_force(groups, kernel, mode, padding_mode):
    torch.manual_seed(0)
    c_in, c_out = 4, 6
    x = torch.randn(2, c_in, 7, 6)
    w = torch.randn(c_out, c_in // groups, kernel, kernel)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, padding="same", groups=groups, bias=False,
                           padding_mode=padding_mode)
    pads = conv_input_pads(conv)
    errors = channel_output_errors(x, w, [2, 3], groups=groups, padding=pads,
                                   padding_mode=padding_mode, weight_mode=mode, weight_bits=3)
    for row, b in enumerate([2, 3]):
        for c in range(c_in):
            xq = x.clone()
            xq[:, c] = daq_quantize(x, b)[:, c]
            if mode == "match":
                wq, ref_w = w.clone(), w
                local, o_g = c % (c_in // groups), c_out // groups
                rows = slice((c // (c_in // groups)) * o_g, (c // (c_in // groups) + 1) * o_g)
                wq[rows, local] = daq_weight_quantize(w, b)[rows, local]
            else:
                wq = ref_w = daq_weight_quantize(w, 3)
            y, yq = conv._conv_forward(x, ref_w, None), conv._conv_forward(xq, wq, None)
            brute = float((yq - y).double().square().sum())
            assert float(errors[row, c]) == pytest.approx(brute, rel=1e-4)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80), st.data())
def test_allocation_meets_the_budget_exactly_and_is_monotone(channels, data):
    choices = data.draw(st.sampled_from([[2, 3, 4], [2, 4], [3, 4], [2, 3], [4]]))
    budget = data.draw(st.integers(choices[0] * channels, choices[-1] * channels))
    if choices == [2, 4]:
        budget -= budget % 2  # only even totals are reachable with {2, 4}
    base = torch.tensor(data.draw(st.lists(st.floats(0.0, 1e3), min_size=channels,
                                           max_size=channels)), dtype=torch.float64)
    decay = torch.tensor([4.0 ** -i for i in range(len(choices))], dtype=torch.float64)
    errors = base[None, :] * decay[:, None]  # error shrinks with bits
    bits = allocate_bits(errors, choices, budget / channels)
    assert int(bits.sum()) == budget  # the average is met exactly
    assert set(bits.tolist()) <= set(choices)
    sens = channel_sensitivity(errors)
    more = sens[:, None] > sens[None, :]
    assert not (more & (bits[:, None] < bits[None, :])).any()  # more sensitive: never fewer bits


def test_allocation_average_three_from_two_three_four():
    errors = torch.tensor([[8.0, 1.0, 4.0, 0.5], [2.0, 0.3, 1.0, 0.2], [0.5, 0.1, 0.3, 0.1]])
    bits = allocate_bits(errors, [2, 3, 4], 3.0)
    assert bits.double().mean() == 3.0
    assert bits.tolist() == [4, 2, 3, 3] or bits.tolist()[0] == 4
    with pytest.raises(ValueError, match="outside"):
        allocate_bits(errors, [2, 3, 4], 4.5)


def test_downstream_gains_of_a_linear_tail():
    """For z -> y = A z (1×1 conv), g_o = E_v[(Aᵀv)_o²] = Σ_k A_ko² for white and DC errors."""
    from torch import fx, nn

    from fxquant.quant.daq_mixed import downstream_gains

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 1, bias=False))
    gm = fx.symbolic_trace(model)
    node = next(n for n in gm.graph.nodes if n.target == "0")
    batches = [(torch.randn(16, 2, 6, 6),)]
    white, dc = downstream_gains(gm, [node], batches, probes=25)[node.name]
    expected = model[1].weight.detach()[:, :, 0, 0].double().pow(2).sum(0)
    assert torch.allclose(white, expected, rtol=0.15)
    assert torch.allclose(dc, expected, rtol=0.35)


def test_output_gains_weight_the_error_of_each_output_channel():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    plain = channel_output_errors(x, w, [3], padding=(1, 1), weight_mode="fixed", weight_bits=4)
    doubled = channel_output_errors(x, w, [3], padding=(1, 1), weight_mode="fixed",
                                    weight_bits=4, output_gains=torch.full((4,), 2.0))
    assert torch.allclose(doubled, 2 * plain, rtol=1e-5)
    same_dc = channel_output_errors(x, w, [3], padding=(1, 1), weight_mode="fixed",
                                    weight_bits=4, output_gains=torch.full((4,), 2.0),
                                    dc_gains=torch.full((4,), 2.0))
    assert torch.allclose(same_dc, doubled, rtol=1e-5)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60), st.data())
def test_cost_weighted_allocation_stays_within_the_budget_and_is_monotone(channels, data):
    choices = data.draw(st.sampled_from([[2, 3, 4], [2, 4], [3]]))
    avg = data.draw(st.floats(choices[0], choices[-1]))
    costs = torch.tensor(data.draw(st.lists(st.floats(1.0, 100.0), min_size=channels,
                                            max_size=channels)), dtype=torch.float64)
    base = torch.tensor(data.draw(st.lists(st.floats(0.0, 1e3), min_size=channels,
                                           max_size=channels)), dtype=torch.float64)
    decay = torch.tensor([4.0 ** -i for i in range(len(choices))], dtype=torch.float64)
    errors = base[None, :] * decay[:, None]
    bits = allocate_bits(errors, choices, avg, costs=costs)
    spent, budget = float((bits * costs).sum()), avg * float(costs.sum())
    assert spent <= budget * (1 + 1e-9)
    # within one channel's step of the budget unless every channel already has the most bits
    step = (choices[-1] - choices[0]) if len(choices) > 1 else 0
    assert spent >= budget - step * float(costs.max()) - 1e-6 or (bits == choices[-1]).all()
    per_cost = channel_sensitivity(errors) / costs
    more = per_cost[:, None] > per_cost[None, :]
    assert not (more & (bits[:, None] < bits[None, :])).any()
