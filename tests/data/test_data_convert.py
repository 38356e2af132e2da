"""Image ↔ tensor conversions and BT.601 YCbCr."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxquant.data.convert import rgb_to_ycbcr, to_tensor, to_uint8, to_y_tensor, ycbcr_to_rgb
from fxquant.metrics import rgb_to_y


def _random_image(seed=0, shape=(6, 5, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_tensor_round_trip_is_exact():
    img = _random_image()
    tensor = to_tensor(img)
    assert tensor.shape == (1, 3, 6, 5) and tensor.dtype == torch.float32
    assert float(tensor[0, 1, 2, 3]) == pytest.approx(img[2, 3, 1] / 255)
    assert np.array_equal(to_uint8(tensor), img)


def test_to_uint8_clamps_and_rounds_half_to_even():
    tensor = torch.tensor([-0.5, 0.0, 1.5, 2.5 / 255, 3.5 / 255, 1.0]).reshape(1, 1, 2, 3)
    assert to_uint8(tensor).tolist() == [[0, 0, 255], [2, 4, 255]]


def test_to_uint8_rejects_batches():
    with pytest.raises(ValueError, match="batch"):
        to_uint8(torch.zeros(2, 3, 4, 4))


def test_ycbcr_of_black_and_white():
    extremes = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    # The /256 coefficients put white at 235.0002, not exactly 235.
    np.testing.assert_allclose(rgb_to_ycbcr(extremes),
                               [[[16, 128, 128], [235, 128, 128]]], atol=2e-4)


def test_ycbcr_round_trip_and_luma_agree_with_metrics():
    img = _random_image(1)
    ycbcr = rgb_to_ycbcr(img)
    np.testing.assert_allclose(ycbcr[..., 0], rgb_to_y(img), atol=1e-9)
    np.testing.assert_allclose(ycbcr_to_rgb(ycbcr), img, atol=1e-9)


def test_y_tensor_is_luma_over_255():
    img = _random_image(2)
    y = to_y_tensor(img)
    assert y.shape == (1, 1, 6, 5) and y.dtype == torch.float32
    np.testing.assert_allclose(y[0, 0].numpy(), rgb_to_y(img) / 255, atol=1e-6)
