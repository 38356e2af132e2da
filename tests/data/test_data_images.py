"""load_image / save_image: modes, round trips and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fxquant.data.images import load_image, save_image
from fxquant.errors import DataError


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "PNG/BMP/JPEG" in str(info.value)


def test_garbage_bytes_name_path(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"this is not an image \x00\x01\x02" * 10)
    with pytest.raises(DataError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert "readable by Pillow" in str(info.value)


def test_truncated_png_raises_data_error(tmp_path):
    path = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="truncated.png"):
        load_image(path)


def test_folder_is_not_an_image(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path)):
        load_image(tmp_path)


def test_greyscale_png_loads_as_three_equal_channels(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (6, 8, 3)
    for channel in range(3):
        assert np.array_equal(img[:, :, channel], grey)


def test_sixteen_bit_greyscale_keeps_top_byte(tmp_path):
    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    img = load_image(path)
    assert img.shape == (3, 4, 3)
    assert np.array_equal(img[:, :, 1], (wide >> 8).astype(np.uint8))


def test_alpha_and_palette_become_rgb(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 7
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.all(load_image(tmp_path / "rgba.png") == [10, 20, 30])

    Image.fromarray(np.full((4, 5), 90, np.uint8), mode="L").convert("LA").save(tmp_path / "la.png")
    assert np.all(load_image(tmp_path / "la.png") == 90)

    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png"), np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("suffix", [".png", ".bmp"])
def test_save_load_round_trip(tmp_path, suffix):
    img = np.random.default_rng(3).integers(0, 256, (7, 9, 3), np.uint8)
    path = tmp_path / "sub" / f"img{suffix}"
    save_image(path, img)
    assert np.array_equal(load_image(path), img)


def test_save_rejects_float_arrays(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_image(tmp_path / "x.png", np.zeros((4, 4, 3)))
