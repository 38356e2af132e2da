"""MATLAB-compatible bicubic imresize: the Set5 oracle and properties on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.data.images import load_image
from fxquant.data.imresize import (_round_to_uint8, bicubic_downscale, bicubic_upscale, imresize,
                                   mod_crop)

SET5 = ("baby", "bird", "butterfly", "head", "woman")


@pytest.mark.data
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_reproduces_set5_lr_bicubic_exactly(data_dir, scale):
    set5 = data_dir / "benchmark" / "Set5"
    for name in SET5:
        hr = load_image(set5 / "HR" / f"{name}.png")
        expected = load_image(set5 / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        produced = bicubic_downscale(hr, scale)
        assert produced.dtype == np.uint8
        assert np.array_equal(produced, expected), \
            f"{name} x{scale}: {np.count_nonzero(produced != expected)} pixels differ"


@pytest.mark.data
def test_scale_only_call_matches_set5(data_dir):
    """imresize(img, 1/s) alone (MATLAB's ceil output size) gives the same LR image."""
    set5 = data_dir / "benchmark" / "Set5"
    hr = mod_crop(load_image(set5 / "HR" / "woman.png"), 3)
    expected = load_image(set5 / "LR_bicubic" / "X3" / "womanx3.png")
    assert np.array_equal(imresize(hr, 1 / 3), expected)


def test_mod_crop_drops_bottom_right():
    img = np.arange(7 * 10).reshape(7, 10)
    assert np.array_equal(mod_crop(img, 3), img[:6, :9])


def test_upscale_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert imresize(img, 2).shape == (10, 14, 3)
    assert imresize(img, 2).dtype == np.uint8
    assert imresize(img, 1.5).shape == (8, 11, 3)
    assert imresize(img.astype(np.float64), output_shape=(9, 4)).shape == (9, 4, 3)
    assert imresize(img.astype(np.float32), 2).dtype == np.float64
    assert imresize(img[:, :, 0], 3).shape == (15, 21)
    assert bicubic_upscale(img, 4).shape == (20, 28, 3)
    assert bicubic_downscale(np.zeros((13, 17, 3), np.uint8), 4).shape == (3, 4, 3)


def test_scale_one_is_identity():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(9, 6, 3), dtype=np.uint8)
    assert np.array_equal(imresize(img, 1.0), img)
    floats = rng.random((4, 5))
    assert np.array_equal(imresize(floats, 1.0), floats)


def test_matlab_rounding_is_half_away_from_zero_and_saturates():
    values = np.array([-3.0, -0.5, 0.5, 1.5, 2.5, 2.4999, 254.5, 300.0])
    assert _round_to_uint8(values).tolist() == [0, 0, 1, 2, 3, 2, 255, 255]


def test_upscale_interpolates_a_ramp_linearly_inside():
    """Cubic convolution reproduces linear functions away from the mirrored borders."""
    ramp = np.tile(np.arange(12, dtype=np.float64) * 10, (3, 1))
    up = imresize(ramp, output_shape=(3, 24))
    u = np.arange(1, 25) / 2 + 0.25 - 1  # MATLAB's input coordinate, 0-based
    interior = slice(4, 20)
    np.testing.assert_allclose(up[1, interior], 10 * u[interior], atol=1e-9)


def test_transpose_commutes_for_float_input():
    rng = np.random.default_rng(2)
    img = rng.random((11, 8))
    np.testing.assert_allclose(imresize(img.T, 1 / 3), imresize(img, 1 / 3).T, atol=1e-12)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scale or output_shape"):
        imresize(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="positive"):
        imresize(np.zeros((4, 4)), -2)
    with pytest.raises(ValueError, match="H×W"):
        imresize(np.zeros(4), 2)


@settings(max_examples=40, deadline=None)
@given(value=st.integers(0, 255),
       height=st.integers(1, 12), width=st.integers(1, 12),
       scale=st.sampled_from([1 / 4, 1 / 3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0]))
def test_constant_image_stays_constant(value, height, width, scale):
    img = np.full((height, width, 3), value, dtype=np.uint8)
    out = imresize(img, scale)
    assert out.shape[:2] == (int(np.ceil(scale * height)), int(np.ceil(scale * width)))
    assert np.all(out == value)
    out_float = imresize(img.astype(np.float64), scale)
    np.testing.assert_allclose(out_float, value, atol=1e-9)
