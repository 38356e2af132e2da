"""PSNR-Y and SSIM-Y against hand-computed values and an independent SSIM implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.metrics import psnr_y, rgb_to_y, ssim_y


def _noise_pair(seed=0, shape=(24, 20, 3), amplitude=12):
    rng = np.random.default_rng(seed)
    hr = rng.integers(40, 216, shape).astype(np.uint8)
    noise = rng.integers(-amplitude, amplitude + 1, shape)
    return np.clip(hr + noise, 0, 255).astype(np.uint8), hr


def _reference_ssim(x, y):
    """Direct SSIM: every 11×11 window weighted by the 2-D Gaussian, one window at a time."""
    coords = np.arange(11) - 5
    g = np.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for top in range(x.shape[0] - 10):
        for left in range(x.shape[1] - 10):
            a = x[top:top + 11, left:left + 11]
            b = y[top:top + 11, left:left + 11]
            mu_a, mu_b = (window * a).sum(), (window * b).sum()
            var_a = (window * (a - mu_a) ** 2).sum()
            var_b = (window * (b - mu_b) ** 2).sum()
            cov = (window * (a - mu_a) * (b - mu_b)).sum()
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                          / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_rgb_to_y_formula():
    pixel = np.array([[[10, 200, 30]]], dtype=np.uint8)
    assert rgb_to_y(pixel)[0, 0] == pytest.approx(16 + (65.738 * 10 + 129.057 * 200
                                                        + 25.064 * 30) / 256)


def test_psnr_of_uniform_red_offset_matches_hand_value():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr.copy()
    sr[..., 0] += 2
    # d_Y = 65.738 * (2/255) / 256 at every pixel: PSNR = -20 log10(d_Y) = 53.9187 dB.
    assert psnr_y(sr, hr, shave=0) == pytest.approx(53.918673, abs=1e-5)
    assert psnr_y(sr, hr, shave=3) == pytest.approx(53.918673, abs=1e-5)


def test_psnr_shave_removes_border_errors():
    hr = np.full((20, 20, 3), 100, np.uint8)
    sr = hr.copy()
    sr[1, 1, 1] += 10
    assert psnr_y(sr, hr, shave=2) == float("inf")
    # One of the 18×18 remaining pixels has d_Y = 129.057 * (10/255) / 256.
    assert psnr_y(sr, hr, shave=1) == pytest.approx(59.185422, abs=1e-5)


def test_psnr_on_y_planes_equals_psnr_on_rgb():
    sr, hr = _noise_pair(1)
    expected = psnr_y(sr, hr, shave=2)
    assert psnr_y(rgb_to_y(sr), rgb_to_y(hr), shave=2) == pytest.approx(expected, abs=1e-9)


def test_psnr_and_ssim_are_symmetric():
    sr, hr = _noise_pair(2)
    assert psnr_y(sr, hr, 4) == psnr_y(hr, sr, 4)
    assert ssim_y(sr, hr, 4) == pytest.approx(ssim_y(hr, sr, 4), abs=1e-12)


def test_identical_images():
    _, hr = _noise_pair(3)
    assert psnr_y(hr, hr, 2) == float("inf")
    assert ssim_y(hr, hr, 2) == 1.0
    assert ssim_y(rgb_to_y(hr), rgb_to_y(hr), 0) == 1.0


def test_ssim_of_noisy_image_is_below_one_and_falls_with_noise():
    mild, hr = _noise_pair(4, amplitude=12)
    strong, same_hr = _noise_pair(4, amplitude=60)
    assert np.array_equal(hr, same_hr)
    assert 0.0 < ssim_y(strong, hr, 2) < ssim_y(mild, hr, 2) < 1.0


def test_ssim_matches_direct_windowed_implementation():
    sr, hr = _noise_pair(5, shape=(17, 15, 3), amplitude=30)
    expected = _reference_ssim(rgb_to_y(sr)[1:-1, 1:-1], rgb_to_y(hr)[1:-1, 1:-1])
    assert ssim_y(sr, hr, shave=1) == pytest.approx(expected, abs=1e-10)


def test_ssim_of_constant_planes_has_closed_form():
    a, b = 90.0, 140.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    value = ssim_y(np.full((16, 16), a), np.full((16, 16), b), shave=0)
    assert value == pytest.approx(expected, abs=1e-12)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(8, 8, 3\).*\(8, 9, 3\)"):
        psnr_y(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8), 0)
    with pytest.raises(ValueError, match=r"\(12, 12\).*\(12, 12, 3\)"):
        ssim_y(np.zeros((12, 12)), np.zeros((12, 12, 3), np.uint8), 0)


def test_too_much_shave_or_too_small_for_ssim():
    img = np.zeros((10, 10, 3), np.uint8)
    with pytest.raises(ValueError, match="shave=5"):
        psnr_y(img, img, 5)
    with pytest.raises(ValueError, match="11×11"):
        ssim_y(img, img, 0)


@settings(max_examples=30, deadline=None)
@given(low=st.integers(1, 39), extra=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_psnr_decreases_as_noise_amplitude_grows(low, extra, seed):
    rng = np.random.default_rng(seed)
    hr = rng.integers(90, 166, (12, 12, 3)).astype(np.uint8)
    pattern = rng.integers(-1, 2, hr.shape)
    pattern[6, 6] = 1  # never all zero
    quieter = (hr + low * pattern).astype(np.uint8)
    louder = (hr + (low + extra) * pattern).astype(np.uint8)
    assert math.isfinite(psnr_y(quieter, hr, 0))
    assert psnr_y(louder, hr, 0) < psnr_y(quieter, hr, 0)
