"""The gpu target's 1×1 GEMM path (fxquant/lower/int_mm.py): bit-exact against the reference
conv with every fused epilogue, taken only where cuBLASLt's shape rules allow, and the same
result as the Triton kernel it replaces."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.lower import int_mm
from fxquant.lower.conv import ReferenceConv2d
from fxquant.lower.triton_conv import GpuConv2d
from fxquant.lower.uniform_codes import IntegerQuantize, quantize_codes

pytest.importorskip("triton", reason="the gpu target needs triton (the gpu extra)")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)",
                allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def gemm_on():
    """The path is off by default (slower than the fused kernel on an H200): on for these
    tests. Module-scoped, so that hypothesis's re-runs see it too."""
    saved, int_mm.USE_INT_MM = int_mm.USE_INT_MM, True
    yield
    int_mm.USE_INT_MM = saved


def pair(cin, cout, zero_point, seed, k=1):
    gen = torch.Generator().manual_seed(seed)
    args = (cin, cout, (k, k), (1, 1), (k // 2, k // 2), (1, 1), 1, True, 8)
    ref, gpu = ReferenceConv2d(*args), GpuConv2d(*args)
    with torch.no_grad():
        ref.weight_codes.copy_(torch.randint(-128, 128, ref.weight_codes.shape, generator=gen,
                                             dtype=torch.int8))
        ref.weight_scale.copy_(torch.rand(cout, generator=gen) * 0.01 + 1e-3)
        ref.bias.copy_(torch.randn(cout, generator=gen))
        ref.input_scale.fill_(0.02)
        ref.input_zero_point.fill_(zero_point)
    gpu.load_state_dict(ref.state_dict(), strict=False)
    return ref, gpu


@contextlib.contextmanager
def counted_gemms():
    """``torch._int_mm`` recording the shapes of its operands while the block runs."""
    calls = []
    real = torch._int_mm

    def counting(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    torch._int_mm = counting
    try:
        yield calls
    finally:
        torch._int_mm = real


@pytest.fixture
def gemm_calls():
    with counted_gemms() as calls:
        yield calls


@settings(max_examples=15, deadline=None)
@given(cin=st.integers(2, 6), cout=st.integers(1, 5), zero_point=st.integers(0, 255),
       relu=st.booleans(), residual=st.booleans(), requantize=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_the_gemm_path_equals_the_reference_bit_for_bit(cin, cout, zero_point, relu, residual,
                                                        requantize, seed):
    cin, cout = 8 * cin, 8 * cout
    ref, gpu = pair(cin, cout, zero_point, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randint(0, 256, (2, cin, 5, 7), generator=gen, dtype=torch.uint8)
    q = q.contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, cout, 5, 7, generator=gen) if residual else None
    expected = ref(q) if r is None else ref(q) + r
    expected = torch.relu(expected) if relu else expected
    quantize = IntegerQuantize(8, channels_last=True)
    quantize.scale.fill_(0.029)
    quantize.zero_point.fill_(0 if relu else 77)
    if requantize:
        expected = quantize_codes(expected, quantize.scale, quantize.zero_point, 255)
        gpu.fuse_output(quantize, relu)
    else:
        gpu.output_relu.fill_(relu)
        gpu.prepare()
    with counted_gemms() as calls:  # (hypothesis re-runs the test: no function fixture)
        out = gpu(q, r)
    assert calls == [((70, cin), (cin, cout))]  # one GEMM over N·H·W rows
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_layers_and_inputs_outside_the_gemm_rules_take_the_triton_kernel(gemm_calls):
    q = torch.randint(0, 256, (1, 16, 4, 4), dtype=torch.uint8)  # 16 rows: M must exceed 16
    ref, gpu = pair(16, 8, 3, seed=1)
    assert torch.equal(gpu(q), ref(q)) and gemm_calls == []
    ref, gpu = pair(12, 8, 3, seed=2)  # K = 12 is not a multiple of 8
    q = torch.randint(0, 256, (1, 12, 6, 6), dtype=torch.uint8)
    assert torch.equal(gpu(q), ref(q)) and gemm_calls == []
    ref, gpu = pair(16, 8, 3, seed=3, k=3)  # 3×3: not a GEMM
    q = torch.randint(0, 256, (1, 16, 6, 6), dtype=torch.uint8)
    assert torch.equal(gpu(q), ref(q)) and gemm_calls == []
    ref, gpu = pair(16, 8, 3, seed=4)
    assert torch.equal(gpu(q), ref(q)) and gemm_calls == [((36, 16), (16, 8))]


def test_switching_the_gemm_off_gives_the_kernel_the_same_answer(gemm_calls, monkeypatch):
    ref, gpu = pair(24, 16, 200, seed=5)
    q = torch.randint(0, 256, (2, 24, 5, 5), dtype=torch.uint8)
    with_gemm = gpu(q)
    monkeypatch.setattr(int_mm, "USE_INT_MM", False)
    assert torch.equal(gpu(q), with_gemm) and len(gemm_calls) == 1
