"""The lowered model's input guard: what the integer graph cannot take is refused by name,
never turned into arbitrary integer codes or a oneDNN/ATen error from inside the graph."""

import pytest
import torch

import fxquant
from fxquant.lower.conv import LoweringError


_COMPILED: dict = {}


@pytest.fixture
def compiled(tiny_sr, calib):
    """The shared tiny model compiled once per recipe for this module (fixed seed and data).
    sym-all quantizes the first conv's input too: the image itself becomes integer codes;
    dfsq and i2nq look codes up in tables, where a NaN index used to reach ATen's indexing."""
    def get(recipe: str):
        if recipe not in _COMPILED:
            _COMPILED[recipe] = fxquant.compile(tiny_sr, recipe, calib=calib)
        return _COMPILED[recipe]
    return get


@pytest.mark.parametrize("recipe", ["mse-w8a8-sym-all", "dfsq-w4a4", "i2nq-w4a4"])
@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_pixels_are_refused(compiled, recipe, target, value):
    lowered = fxquant.lowered_copy(compiled(recipe), target)
    x = torch.rand(2, 3, 12, 12)
    x[1, 2, 5, 7] = value
    x[0, 0, 0, 0] = value
    with pytest.raises(LoweringError, match=r"got an image with 2 NaN/inf values "
                                            r"\(shape \(2, 3, 12, 12\)\)"):
        lowered(x)
    x[1, 2, 5, 7] = x[0, 0, 0, 0] = 0.5  # the same model still runs finite images
    assert torch.isfinite(lowered(x)).all()


def test_non_finite_pixels_are_refused_in_front_of_the_compiled_graph(compiled):
    lowered = fxquant.lowered_copy(compiled("mse-w8a8-sym-all"), "cpu", compile=True)
    x = torch.rand(1, 3, 12, 12)
    expected = lowered(x)
    x[0, 1, 3, 3] = float("nan")
    with pytest.raises(LoweringError, match="1 NaN/inf values"):
        lowered(x)
    x[0, 1, 3, 3] = torch.rand(1, 3, 12, 12)[0, 1, 3, 3]
    assert torch.isfinite(lowered(x)).all() and expected.shape == lowered(x).shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_float_dtypes_are_refused_by_name(compiled, dtype):
    lowered = fxquant.lowered_copy(compiled("mse-w8a8-sym-all"), "reference")
    with pytest.raises(LoweringError, match=f"takes float32 images, got {dtype}; convert the "
                                            r"input with x.float\(\)"):
        lowered(torch.rand(1, 3, 8, 8, dtype=dtype))


def test_the_finite_check_counts_only_when_the_sum_is_not_finite():
    """The fast path is one sum; a sum that overflows on finite values counts no NaN/inf and
    is not reported as one."""
    from fxquant.lower.guard import _check_finite

    _check_finite(torch.full((1, 3, 4, 4), 3e38))  # sum overflows to inf, no value is
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, 0, :2] = torch.tensor([float("inf"), -float("inf")])  # the sum is NaN
    with pytest.raises(LoweringError, match="with 2 NaN/inf values"):
        _check_finite(x)
