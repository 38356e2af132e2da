"""calibration_patches: seeded LR (and HR) patches from training sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxquant.data.images import save_image
from fxquant.data.imresize import bicubic_downscale
from fxquant.data.patches import calibration_patches
from fxquant.errors import CalibrationError, DataError
from fxquant.metrics import rgb_to_y


@pytest.fixture
def noise_root(tmp_path):
    """A training set with one 40×36 noise image and one image too small for 8-px x2 patches."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "train" / "Noise" / "HR"
    big = rng.integers(0, 256, (40, 36, 3), np.uint8)
    save_image(folder / "a_big.png", big)
    save_image(folder / "b_small.png", rng.integers(0, 256, (14, 30, 3), np.uint8))
    return tmp_path, big


@pytest.mark.data
def test_t91_patches_shape_dtype_range_and_determinism(data_dir):
    patches = calibration_patches(16, 24, 4, root=data_dir, seed=3)
    assert patches.shape == (16, 3, 24, 24) and patches.dtype == torch.float32
    assert 0.0 <= float(patches.min()) and float(patches.max()) <= 1.0
    assert float(patches.std()) > 0.01
    assert torch.equal(patches, calibration_patches(16, 24, 4, root=data_dir, seed=3))
    assert not torch.equal(patches, calibration_patches(16, 24, 4, root=data_dir, seed=4))


@pytest.mark.data
def test_missing_training_set_names_path(data_dir):
    with pytest.raises(DataError) as info:
        calibration_patches(4, 16, 2, sets=("T92",), root=data_dir)
    assert str(data_dir / "train" / "T92" / "HR") in str(info.value)
    assert "T91" in str(info.value)


def test_n_below_one_is_a_calibration_error(noise_root):
    with pytest.raises(CalibrationError, match="n=0"):
        calibration_patches(0, 8, 2, sets=("Noise",), root=noise_root[0])


def test_unknown_color_mode(noise_root):
    with pytest.raises(CalibrationError, match="color"):
        calibration_patches(1, 8, 2, sets=("Noise",), root=noise_root[0], color="lab")


def test_patches_too_large_for_every_image(noise_root):
    with pytest.raises(CalibrationError, match="21×21"):
        calibration_patches(2, 21, 2, sets=("Noise",), root=noise_root[0])


def test_lr_and_hr_patches_are_aligned_windows_of_the_big_image(noise_root):
    root, big = noise_root
    lr_image = bicubic_downscale(big, 2)
    lr, hr = calibration_patches(12, 8, 2, sets=("Noise",), root=root, seed=1, with_hr=True)
    assert lr.shape == (12, 3, 8, 8) and hr.shape == (12, 3, 16, 16)
    for lr_patch, hr_patch in zip(lr, hr):
        lr_pixels = np.rint(lr_patch.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        matches = [(top, left) for top in range(lr_image.shape[0] - 7)
                   for left in range(lr_image.shape[1] - 7)
                   if np.array_equal(lr_image[top:top + 8, left:left + 8], lr_pixels)]
        assert len(matches) == 1, "the small image must be skipped; noise windows are unique"
        top, left = matches[0]
        hr_pixels = np.rint(hr_patch.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        assert np.array_equal(hr_pixels, big[2 * top:2 * top + 16, 2 * left:2 * left + 16])


def test_y_patches_are_luma_of_rgb_patches(noise_root):
    root, _ = noise_root
    rgb = calibration_patches(5, 6, 2, sets=("Noise",), root=root, seed=9)
    y = calibration_patches(5, 6, 2, sets=("Noise",), root=root, seed=9, color="y")
    assert y.shape == (5, 1, 6, 6) and y.dtype == torch.float32
    for rgb_patch, y_patch in zip(rgb, y):
        pixels = np.rint(rgb_patch.numpy().transpose(1, 2, 0) * 255)
        np.testing.assert_allclose(y_patch[0].numpy(), rgb_to_y(pixels) / 255, atol=1e-6)
