"""The ``gpu`` target's Triton int8 conv, run on the CPU by the Triton interpreter
(``TRITON_INTERPRET=1``): bit-exact against the ``reference`` target on random layers, with and
without the fused ReLU / residual / requantization epilogue, odd channel counts, groups,
strides and dilations; and the ``lower{target=gpu}`` pass end to end."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.triton_conv import GpuConv2d
from fxquant.lower.uniform_codes import IntegerQuantize, quantize_codes
from fxquant.recipe import ActivationConfig, LayerConfig, Recipe, WeightConfig

pytest.importorskip("triton", reason="the gpu target's kernels need triton (the gpu extra)")


if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)",
                allow_module_level=True)


def layers(cin, cout, k, stride, padding, dilation, groups, zero_point, seed, centred=False):
    gen = torch.Generator().manual_seed(seed)
    args = (cin, cout, (k, k), (stride, stride), (padding, padding), (dilation, dilation),
            groups, True, 8)
    ref, gpu = ReferenceConv2d(*args), GpuConv2d(*args)
    with torch.no_grad():
        ref.weight_codes.copy_(torch.randint(-128, 128, ref.weight_codes.shape, generator=gen,
                                             dtype=torch.int8))
        if centred:
            ref.weight_centre.copy_(torch.randint(0, 100, (cout,), generator=gen))
        ref.weight_scale.copy_(torch.rand(cout, generator=gen) * 0.01 + 1e-3)
        ref.bias.copy_(torch.randn(cout, generator=gen))
        ref.input_scale.fill_(0.02)
        ref.input_zero_point.fill_(zero_point)
    gpu.load_state_dict(ref.state_dict(), strict=False)  # the epilogue buffers keep defaults
    return ref, gpu


def codes(n, c, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)
    return q.contiguous(memory_format=torch.channels_last)


@settings(max_examples=12, deadline=None)
@given(cin=st.integers(1, 40), cout=st.integers(1, 37), k=st.sampled_from([1, 3, 5]),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]),
       zero_point=st.integers(0, 255), seed=st.integers(0, 2 ** 16))
def test_the_kernel_equals_the_reference_bit_for_bit(cin, cout, k, stride, dilation, groups,
                                                     zero_point, seed):
    cin, cout = cin * groups, cout * groups  # odd per-group counts: padded to the K block
    ref, gpu = layers(cin, cout, k, stride, k // 2 * dilation, dilation, groups, zero_point, seed)
    q = codes(2, cin, 7, 9, seed)
    assert torch.equal(gpu(q), ref(q))


def test_a_zero_padded_border_is_exact_for_every_zero_point():
    for zero_point in (0, 128, 255):
        ref, gpu = layers(5, 6, 3, 1, 2, 1, 1, zero_point, seed=1)
        q = codes(1, 5, 4, 4, seed=2)  # padding 2 on a 4×4 input: most taps in the border
        assert torch.equal(gpu(q), ref(q))


def test_centred_asymmetric_weights_add_the_same_correction():
    ref, gpu = layers(6, 4, 3, 1, 1, 1, 2, 40, seed=3, centred=True)
    q = codes(2, 6, 6, 5, seed=4)
    assert torch.equal(gpu(q), ref(q))


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("requantize", [False, True])
def test_the_fused_epilogue_equals_the_unfused_ops(relu, residual, requantize):
    ref, gpu = layers(19, 21, 3, 1, 1, 1, 1, 17, seed=5)
    q = codes(2, 19, 6, 7, seed=6)
    r = torch.randn(2, 21, 6, 7, generator=torch.Generator().manual_seed(7)) if residual else None
    quantize = IntegerQuantize(8, channels_last=True)
    quantize.scale.fill_(0.037)
    quantize.zero_point.fill_(0 if relu else 90)
    expected = ref(q)
    if residual:
        expected = expected + r
    if relu:
        expected = torch.relu(expected)
    if requantize:
        expected = quantize_codes(expected, quantize.scale, quantize.zero_point, 255)
        gpu.fuse_output(quantize, relu)
    elif relu:
        gpu.output_relu.fill_(True)
        gpu.prepare()
    out = gpu(q, r)
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)


def test_requantization_rounds_half_to_even_like_torch():
    """Values landing exactly on .5 (and just below it) after the division."""
    ref, gpu = layers(1, 1, 1, 1, 0, 1, 1, 0, seed=8)
    with torch.no_grad():
        for layer in (ref, gpu):
            layer.weight_codes.fill_(1)
            layer.weight_scale.fill_(1.0)
            layer.bias.fill_(0.0)
            layer.input_scale.fill_(0.5)
    gpu.prepare()
    quantize = IntegerQuantize(8, channels_last=True)
    quantize.scale.fill_(1.0)
    gpu.fuse_output(quantize, relu=False)
    q = torch.arange(0, 12, dtype=torch.uint8).view(1, 1, 3, 4).contiguous(
        memory_format=torch.channels_last)  # y = q / 2: 0, 0.5, 1, 1.5, ...
    expected = quantize_codes(ref(q), quantize.scale, quantize.zero_point, 255)
    assert torch.equal(gpu(q), expected)
    assert gpu(q).flatten().tolist()[:6] == [0, 0, 1, 2, 2, 2]


def _all_integer_recipe() -> Recipe:
    """Symmetric int8 weights (fusable) and every conv quantized, so that no float conv reads
    a differently laid out tensor: the whole graph is then integer-exact."""
    return Recipe(name="sym-all", weights=WeightConfig(observer="symmetric"),
                  activations=ActivationConfig(observer="mse"),
                  layers=LayerConfig(keep_first_last=False))


def test_lower_gpu_fuses_and_equals_the_reference_target(tiny_sr):
    fake = fxquant.compile(tiny_sr, _all_integer_recipe(), calib=torch.rand(8, 3, 16, 16))
    reference = fxquant.lowered_copy(fake, "reference")
    gpu = fxquant.lowered_copy(fake, "gpu")
    info = gpu.fxquant_history[-1][1]
    assert info["integer_convs"] == 6
    assert info["fused_residuals"] == 2  # h + block(h), twice
    # conv → ReLU → quantize inside each block, and the last block's conv + residual, read
    # only by the tail's quantizer
    assert info["uint8_outputs"] == 3
    assert "add" not in info["float_ops"] and "ReLU" not in info["float_ops"]
    x = torch.rand(2, 3, 11, 13)
    assert torch.equal(gpu(x), reference(x))


def test_lower_gpu_without_fusion_and_with_asymmetric_weights(tiny_sr):
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=torch.rand(8, 3, 16, 16))
    reference = fxquant.lowered_copy(fake, "reference")
    gpu = fxquant.lowered_copy(fake, "gpu", fuse=False)
    x = torch.rand(1, 3, 10, 9)
    assert torch.equal(gpu(x), reference(x))


def test_a_saved_gpu_lowered_model_loads_and_runs(tiny_sr, tmp_path):
    fake = fxquant.compile(tiny_sr, _all_integer_recipe(), calib=torch.rand(8, 3, 16, 16))
    gpu = fxquant.lowered_copy(fake, "gpu")
    fxquant.save(gpu, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", model=type(tiny_sr)().eval())
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(loaded(x), gpu(x))


def test_without_cuda_or_the_interpreter_the_error_says_how_to_run(monkeypatch, tiny_sr):
    monkeypatch.delenv("TRITON_INTERPRET")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    fake = fxquant.compile(tiny_sr, "minmax-w8a8", calib=torch.rand(8, 3, 16, 16))
    with pytest.raises(fxquant.FxquantError, match="TRITON_INTERPRET=1"):
        fxquant.lowered_copy(fake, "gpu")


@pytest.mark.parametrize("recipe", ["minmax-w8a8", "daq-w4a4"])
def test_reflect_and_circular_padding_lower_on_gpu(recipe):
    """The gpu convs pad their codes with the mode first, as the other targets do
    (fxquant/lower/padding.py): the uniform model equals the reference target up to the float
    order of the asymmetric weights' centring correction (as with zero padding), the DAQ
    model its cpu twin up to the per-image weight planes' float rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
    fake = fxquant.compile(model, recipe, calib=torch.rand(8, 3, 12, 12))
    uniform = recipe == "minmax-w8a8"
    gpu = fxquant.lowered_copy(fake, "gpu")
    other = fxquant.lowered_copy(fake, "reference" if uniform else "cpu")
    x = torch.rand(1, 3, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(gpu(x), other(x), rtol=0, atol=1e-6 if uniform else 1e-4)


# ------------------------------------------------------- DAQ and DFSQ: per-(image, channel) scales
@pytest.mark.parametrize("recipe, subset_codes", [("daq-w4a4", "exact"), ("dfsq-w4a4", "exact"),
                                                  ("dfsq-w4a4", "u8")])
def test_daq_and_dfsq_lower_on_gpu_as_on_cpu(recipe, subset_codes, tiny_sr, calib):
    """The gpu target runs the cpu target's per-image folded int8 weight planes through the
    Triton kernel: each conv equals its cpu twin up to the epilogue's float rounding, and the
    whole model follows the cpu-lowered one (DFSQ's one-byte codes too)."""
    from fxquant.lower.compare import daq_layer_agreement
    from fxquant.lower.folded import CpuDaqConv2d
    from fxquant.lower.triton_conv import GpuDaqConv2d

    fake = fxquant.compile(tiny_sr, recipe, calib=calib)
    cpu, gpu = (fxquant.lowered_copy(fake, target, subset_codes=subset_codes)
                for target in ("cpu", "gpu"))
    gpu_convs = [m for m in gpu.modules() if isinstance(m, GpuDaqConv2d)]
    assert gpu_convs and len(gpu_convs) == sum(isinstance(m, CpuDaqConv2d) and
                                               not isinstance(m, GpuDaqConv2d)
                                               for m in cpu.modules())
    x = calib[:1]  # (the interpreter is slow)
    per_layer = dict((n, d) for n, d, _ in daq_layer_agreement(fake, gpu, [x]))
    # the two int8 weight planes, as on cpu; one-byte codes move each value by up to half a
    # level (span/510 of the normalized range)
    assert max(per_layer.values()) < (3e-4 if subset_codes == "exact" else 2e-2)
    seen = {}

    def keep(name):
        def hook(_module, args, out):
            seen.setdefault(name, (args[0], out))
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in gpu.named_modules()
               if isinstance(m, GpuDaqConv2d)]
    with torch.no_grad():
        out_gpu = gpu(x)
    for h in handles:
        h.remove()
    cpu_modules = dict(cpu.named_modules())
    with torch.no_grad():
        for name, (packed, out) in seen.items():  # the same packed input through the cpu twin
            torch.testing.assert_close(cpu_modules[name](packed), out, rtol=1e-5, atol=1e-5)
        out_cpu = cpu(x)
    rel = float((out_gpu - out_cpu).abs().max() / out_cpu.abs().max())
    assert rel < 1e-2


def test_per_image_weights_in_one_launch_equal_one_launch_per_image():
    """``per_image``: each image's rows read their own weights, scales and bias; the same
    integers as launching the static kernel image by image, bit for bit."""
    from fxquant.lower.triton_conv import int8_conv

    gen = torch.Generator().manual_seed(11)
    n, cin, cout, k, groups = 3, 10, 14, 3, 2
    q = codes(n, cin, 9, 7, seed=12)  # 63 rows per image: tiles end inside an image
    weights = torch.randint(-127, 128, (n, k, k, cin // groups, cout), generator=gen,
                            dtype=torch.int8)
    sums = weights.to(torch.int32).sum(dim=(1, 2, 3))
    scale = torch.rand(n, cout, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, cout, generator=gen)
    residual = torch.randn(n, cout, 9, 7, generator=gen)
    geometry = dict(kernel_size=(k, k), stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                    groups=groups)
    batched = int8_conv(q, weights, sums, scale, bias, 0, residual=residual, per_image=True,
                        **geometry)
    for i in range(n):
        alone = int8_conv(q[i:i + 1], weights[i], sums[i], scale[i].contiguous(),
                          bias[i].contiguous(), 0, residual=residual[i:i + 1], **geometry)
        assert torch.equal(batched[i:i + 1], alone)


@pytest.mark.parametrize("planes", [1, 2])
def test_a_batch_of_images_through_the_gpu_daq_conv_equals_the_cpu_conv(planes, tiny_sr, calib):
    """Three images at once (per-image folded weights, one launch per plane, the border rows
    found once and kept): each conv's output equals its cpu twin's on the same packed input."""
    from fxquant.lower.folded import CpuDaqConv2d
    from fxquant.lower.triton_conv import GpuDaqConv2d

    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)
    cpu = fxquant.lowered_copy(fake, "cpu", planes=planes)
    gpu = fxquant.lowered_copy(fake, "gpu", planes=planes)
    seen = {}

    def keep(name):
        def hook(_module, args, out):
            seen[name] = (args[0], out)
        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in gpu.named_modules()
               if isinstance(m, GpuDaqConv2d)]
    x = calib[:3]
    with torch.no_grad():
        gpu(x)
        gpu(x)  # the second call reads the kept border rows
    for h in handles:
        h.remove()
    cpu_modules = dict(cpu.named_modules())
    assert seen and all(isinstance(cpu_modules[name], CpuDaqConv2d) for name in seen)
    assert all(m.weight_planes == planes for m in gpu.modules() if isinstance(m, GpuDaqConv2d))
    with torch.no_grad():
        for name, (packed, out) in seen.items():
            assert out.shape[0] == 3
            torch.testing.assert_close(cpu_modules[name](packed), out, rtol=1e-5, atol=1e-5)


def test_gpu_daq_codes_use_all_of_uint8(tiny_sr, calib, monkeypatch):
    """The Triton dot on shifted codes cannot saturate, so balanced codes go up to 255
    whatever this CPU's int8 pairs do (here: a CPU whose pairs saturate, where cpu keeps
    its codes to 128)."""
    from fxquant.lower.daq import DaqQuantize

    monkeypatch.setenv("FXQUANT_INT8_PAIRS", "saturating")
    fake = fxquant.compile(tiny_sr, "daq-w4a4", calib=calib)

    def limits(target):
        lowered = fxquant.lowered_copy(fake, target)
        return {m.code_limit for m in lowered.modules() if isinstance(m, DaqQuantize)}

    assert limits("cpu") == {128}
    assert limits("gpu") == {255}
