"""BenchmarkSet: pairing stored or generated LR images with mod-cropped HR images."""

from __future__ import annotations

import numpy as np
import pytest

from fxquant.data.benchmark import BENCHMARK_SETS, BenchmarkSet
from fxquant.data.images import load_image, save_image
from fxquant.data.imresize import bicubic_downscale
from fxquant.errors import DataError


def _make_set(root, name, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "benchmark" / name / "HR"
    for index, (height, width) in enumerate(sizes):
        save_image(folder / f"im{index}.png", rng.integers(0, 256, (height, width, 3), np.uint8))
    return folder


@pytest.mark.data
def test_set5_x4_pairs_come_from_stored_lr(data_dir):
    pairs = list(BenchmarkSet("Set5", 4, root=data_dir))
    assert [p.name for p in pairs] == ["baby", "bird", "butterfly", "head", "woman"]
    for pair in pairs:
        assert pair.lr.dtype == np.uint8 and pair.hr.dtype == np.uint8
        assert (pair.lr.shape[0] * 4, pair.lr.shape[1] * 4, 3) == pair.hr.shape
        stored = load_image(data_dir / "benchmark/Set5/LR_bicubic/X4" / f"{pair.name}x4.png")
        assert np.array_equal(pair.lr, stored)


@pytest.mark.data
def test_set14_bridge_is_three_equal_channels(data_dir):
    benchmark = BenchmarkSet("Set14", 2, root=data_dir)
    assert len(benchmark) == 14 and benchmark.lr_folder is None
    bridge = next(pair for pair in benchmark if pair.name == "bridge")
    for image in (bridge.hr, bridge.lr):
        assert image.ndim == 3 and image.shape[2] == 3
        assert np.array_equal(image[..., 0], image[..., 1])
        assert np.array_equal(image[..., 0], image[..., 2])
    assert np.array_equal(bridge.lr, bicubic_downscale(bridge.hr, 2))


@pytest.mark.data
def test_limit_takes_first_images_in_name_order(data_dir):
    benchmark = BenchmarkSet("Urban100", 3, root=data_dir, limit=2)
    assert len(benchmark) == 2
    assert [pair.name for pair in benchmark] == ["img_001", "img_002"]
    assert set(BENCHMARK_SETS) <= {p.name for p in (data_dir / "benchmark").iterdir()}


@pytest.mark.data
def test_missing_set_names_path_and_existing_sets(data_dir):
    with pytest.raises(DataError) as info:
        BenchmarkSet("Set6", 2, root=data_dir)
    message = str(info.value)
    assert str(data_dir / "benchmark" / "Set6" / "HR") in message
    assert "Set5" in message and "Urban100" in message


def test_generated_lr_when_no_lr_folder(tmp_path):
    _make_set(tmp_path, "Tiny", [(13, 10), (8, 8)])
    pairs = list(BenchmarkSet("Tiny", 4, root=tmp_path))
    assert [p.hr.shape for p in pairs] == [(12, 8, 3), (8, 8, 3)]
    assert [p.lr.shape for p in pairs] == [(3, 2, 3), (2, 2, 3)]
    assert np.array_equal(pairs[0].lr, bicubic_downscale(pairs[0].hr, 4))


@pytest.mark.parametrize("lr_name", ["im0x2.png", "im0.png"])
def test_stored_lr_accepts_both_naming_conventions(tmp_path, lr_name):
    hr_folder = _make_set(tmp_path, "Named", [(8, 6)])
    marker = np.full((4, 3, 3), 77, np.uint8)
    save_image(hr_folder.parent / "LR_bicubic" / "X2" / lr_name, marker)
    (pair,) = BenchmarkSet("Named", 2, root=tmp_path)
    assert np.array_equal(pair.lr, marker)


def test_stored_lr_of_wrong_shape_is_rejected(tmp_path):
    hr_folder = _make_set(tmp_path, "Bad", [(8, 6)])
    save_image(hr_folder.parent / "LR_bicubic" / "X2" / "im0x2.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(DataError, match=r"expected \(4, 3, 3\)"):
        next(iter(BenchmarkSet("Bad", 2, root=tmp_path)))


def test_missing_stored_lr_file_is_reported(tmp_path):
    hr_folder = _make_set(tmp_path, "Gap", [(8, 6)])
    (hr_folder.parent / "LR_bicubic" / "X2").mkdir(parents=True)
    with pytest.raises(DataError, match="im0x2.png"):
        next(iter(BenchmarkSet("Gap", 2, root=tmp_path)))


def test_invalid_scale_and_limit(tmp_path):
    _make_set(tmp_path, "Tiny", [(8, 8)])
    with pytest.raises(DataError, match="scale"):
        BenchmarkSet("Tiny", 0, root=tmp_path)
    with pytest.raises(DataError, match="limit"):
        BenchmarkSet("Tiny", 2, root=tmp_path, limit=0)


def test_an_unreadable_benchmark_folder_is_a_data_error(tmp_path, monkeypatch):
    from pathlib import Path

    _make_set(tmp_path, "Locked", [(8, 8)])

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(DataError, match=r"cannot list images in .*Locked.*Permission denied"):
        BenchmarkSet("Locked", 2, root=tmp_path)


def test_an_hr_image_too_small_to_score_is_named(tmp_path):
    from fxquant.evaluate import evaluate

    _make_set(tmp_path, "Small", [(64, 64), (16, 40)])
    upscale = lambda x: x.repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    with pytest.raises(DataError, match=r"Small image 'im1' is 16×40 .*at least 19×19"):
        evaluate(upscale, BenchmarkSet("Small", 4, root=tmp_path), "rgb")
