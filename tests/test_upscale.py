"""fxquant upscale: tiles that agree with the whole image, the evaluation's conversions,
grey/RGBA/Y inputs, the command line and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fxquant.cli import main
from fxquant.data import (
    imresize, load_image, rgb_to_ycbcr, to_tensor, to_y_tensor, ycbcr_to_rgb,
)
from fxquant.evaluate import super_resolve
from fxquant.models.user import resolve_model
from fxquant.upscale import (
    InputImage, _bicubic_strips, default_tiling, read_input, receptive_radius, upscale_image,
    upscale_tiled,
)
from fxquant.upscale_tiling import seam_ramp, window_shapes, window_spans

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:no --weights")]

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_sr.py"
TINY = f"{FIXTURE}:TinySR"


def _tiny(upscale: int = 2, channels: int = 3) -> torch.nn.Module:
    model = resolve_model(TINY, init={"upscale": upscale, "channels": channels},
                          color="y" if channels == 1 else "rgb").build()
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise uint8 RGB test image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 128 + 80 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None]
    return np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("length, step, overlap", [(512, 96, 8), (100, 100, 5), (7, 3, 2),
                                                   (513, 64, 0)])
def test_tile_interiors_cover_the_image_once(length, step, overlap):
    spans = window_spans(length, step, overlap)
    covered = np.zeros(length, int)
    for start, end, w0, w1 in spans:
        covered[start:end] += 1
        assert w0 == max(0, start - overlap) and w1 == min(length, end + overlap)
        assert w1 - w0 <= step + 2 * overlap
    assert (covered == 1).all()


@pytest.mark.parametrize("sizes, tile, overlap", [([(40, 52), (40, 52)], 24, 4),
                                                   ([(17, 9), (9, 17), (30, 30)], 0, 3),
                                                   ([(100, 61)], 512, 10)])
def test_window_shapes_are_the_shapes_the_model_sees(sizes, tile, overlap):
    seen = set()

    def spy(x):
        seen.add(tuple(x.shape[-2:]))
        return torch.zeros(1, 3, x.shape[-2] * 2, x.shape[-1] * 2)

    for height, width in sizes:
        upscale_tiled(spy, torch.zeros(1, 3, height, width), 2, tile, overlap)
    assert window_shapes(sizes, tile, overlap) == seen


def test_receptive_radius_of_three_3x3_convs_is_measured_as_3():
    radius, local = receptive_radius(_tiny(), 3, 2)
    assert (radius, local) == (3, True)
    assert default_tiling(radius) == (512, 10, 0)  # local: crop, no cross-fade
    assert default_tiling(8, local=False) == (512, 32, 22)


def test_the_model_sees_fresh_contiguous_inference_tensors():
    """A compiled model guards its input's strides, storage offset and whether it is an
    inference tensor: windows handed over as views of the image (strides of each image's
    width, an offset per window) or a mix of tensor kinds recompiled it per image and window."""
    model, seen = _tiny(), []

    def spy(x):
        seen.append((x.is_contiguous(), x.storage_offset(), x.is_inference()))
        return model(x)

    receptive_radius(spy, 3, 2)
    lr = to_tensor(_image(40, 52))
    upscale_tiled(spy, lr, 2, 24, 4)
    assert len(seen) > 6 and set(seen) == {(True, 0, True)}, seen


def test_tiled_equals_whole_within_one_grey_level_on_512x512():
    model = _tiny(2)
    lr = to_tensor(_image(512, 512))
    radius, _ = receptive_radius(model, 3, 2)
    whole = upscale_tiled(model, lr, 2, 0, 0)
    tiled = upscale_tiled(model, lr, 2, 96, default_tiling(radius)[1])  # 49 windows
    assert whole.shape == tiled.shape == (1024, 1024, 3)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3  # only float rounding of differently sized convs
    # too little context does show at the seams: the overlap is what makes them invisible
    seams = upscale_tiled(model, lr, 2, 96, 0)
    assert np.abs(whole.astype(int) - seams.astype(int)).max() > 1


@pytest.mark.parametrize("channels", [1, 3])
def test_cross_fade_weights_sum_to_one_so_each_pixel_is_their_weighted_mean(channels):
    size, scale, tile, overlap, half = 200, 2, 100, 20, 15
    levels = []

    def constant(x):  # each window answers one grey level of its own
        levels.append(0.1 + 0.05 * len(levels))
        return torch.full((1, channels, x.shape[-2] * scale, x.shape[-1] * scale), levels[-1])

    out = upscale_tiled(constant, torch.zeros(1, channels, size, size), scale, tile, overlap,
                        blend=half).astype(float)
    out = out if channels == 1 else out[:, :, 0]
    expected, total = np.zeros(out.shape), np.zeros(out.shape)
    spans = window_spans(size, tile - 2 * overlap, overlap)
    windows = [(ys, xs) for ys in spans for xs in spans]
    assert len(levels) == len(windows) == 16
    for level, ((y0, y1, _, _), (x0, x1, _, _)) in zip(levels, windows):
        ry0, ry1, rx0, rx1 = max(0, y0 - half), min(size, y1 + half), max(0, x0 - half), \
            min(size, x1 + half)
        weight = np.outer(seam_ramp(ry0, ry1, y0, y1, size, half, scale),
                          seam_ramp(rx0, rx1, x0, x1, size, half, scale))
        expected[ry0 * scale:ry1 * scale, rx0 * scale:rx1 * scale] += weight * level * 255
        total[ry0 * scale:ry1 * scale, rx0 * scale:rx1 * scale] += weight
    np.testing.assert_allclose(total, 1, atol=1e-6)
    assert np.abs(out - expected).max() <= 0.5 + 1e-4  # the final rounding only


def test_image_wide_statistics_are_measured_and_their_seams_cross_faded():
    tiny = _tiny(2)
    for p in tiny.parameters():
        p.data.mul_(0.2)  # outputs inside 0..255: no clipping to blur the comparison

    def global_mean(x):  # a local net plus an image-wide term, like IMDN's channel attention
        return tiny(x) + 0.5 * (x.mean() - 0.5)

    radius, local = receptive_radius(global_mean, 3, 2)
    assert (radius, local) == (3, False)
    tile, overlap, blend = default_tiling(radius, local, tile=128)
    image = np.clip(_image(256, 256), 60, 200)
    image[:, :128] //= 2  # a dark half: windows see very different means
    lr = to_tensor(image)
    whole = upscale_tiled(global_mean, lr, 2, 0, 0).astype(float)
    inside = (whole > 24) & (whole < 231)  # a window's tone shift moves none of these to a clip

    def worst_step(out):  # largest jump of (tiled - whole) between unclipped neighbours
        err = np.where(inside, out.astype(float) - whole, np.nan)
        return max(np.nanmax(np.abs(np.diff(err, axis=0))), np.nanmax(np.abs(np.diff(err, axis=1))))

    cropped = upscale_tiled(global_mean, lr, 2, tile, overlap)
    faded = upscale_tiled(global_mean, lr, 2, tile, overlap, blend=blend)
    assert worst_step(cropped) > 6  # a window's own mean shifts its tone: a visible seam
    assert worst_step(faded) <= 2   # spread over the overlap: no step beyond rounding
    assert np.abs(faded - whole).max() <= np.abs(cropped - whole).max() + 1


def test_whole_image_in_one_tile_is_super_resolve_bit_for_bit():
    model = _tiny(3)
    image = _image(40, 30)
    assert np.array_equal(upscale_tiled(model, to_tensor(image), 3, 512, 10),
                          super_resolve(model, image, "rgb"))


def test_tile_must_leave_an_interior():
    with pytest.raises(Exception, match=r"--tile 20 must be larger than 2 × --overlap \(20\)"):
        upscale_tiled(_tiny(), to_tensor(_image(30, 30)), 2, 20, 10)


def test_bicubic_in_strips_is_the_whole_resize():
    plane = rgb_to_ycbcr(_image(600, 37))[:, :, 1:]  # 3 strips of 256 LR rows
    out = np.empty((1800, 111, 2))

    def put(r0, r1, rows):
        out[r0 * 3:r1 * 3] = rows

    _bicubic_strips(plane, 3, put)
    # the same taps; weights differ in the last bit (a strip's coordinates are offset)
    np.testing.assert_allclose(out, imresize(plane, scale=3.0, output_shape=(1800, 111)),
                               rtol=0, atol=1e-9)
    alpha = _image(300, 20)[:, :, 0]
    out8 = np.empty((600, 40), np.uint8)

    def put8(r0, r1, rows):
        out8[r0 * 2:r1 * 2] = rows

    _bicubic_strips(alpha, 2, put8)
    assert np.array_equal(out8, imresize(alpha, scale=2.0, output_shape=(600, 40)))


def test_y_model_runs_on_luma_as_in_evaluation_and_chroma_is_bicubic():
    model = _tiny(2, channels=1)
    image = _image(300, 40)
    out = upscale_image(model, InputImage(image, None, False), "y", 2, 64, 10)
    y_eval = super_resolve(model, image, "y")  # the evaluation's rounded Y plane
    cbcr = imresize(rgb_to_ycbcr(image)[:, :, 1:], scale=2.0, output_shape=(600, 80))
    expected = np.clip(np.rint(ycbcr_to_rgb(np.concatenate([y_eval[..., None], cbcr], 2))),
                       0, 255).astype(np.uint8)
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    whole = upscale_image(model, InputImage(image, None, False), "y", 2, 0, 0)
    assert np.array_equal(whole, expected)


def test_grey_and_rgba_inputs(tmp_path):
    rgb = _image(20, 24)
    grey = rgb[:, :, 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    alpha = np.linspace(0, 255, 20 * 24).reshape(20, 24).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "photo.webp", lossless=True)

    g = read_input(tmp_path / "grey.png")
    assert g.grey and g.alpha is None and np.array_equal(g.rgb, np.dstack([grey] * 3))
    rgb_model, y_model = _tiny(2), _tiny(2, channels=1)
    out = upscale_image(rgb_model, g, "rgb", 2, 0, 0)  # replicated to RGB for an RGB model
    assert out.shape == (40, 48, 3)
    assert np.array_equal(out, super_resolve(rgb_model, g.rgb, "rgb"))
    out = upscale_image(y_model, g, "y", 2, 0, 0)  # luma only: a grey result, saved grey
    assert out.shape == (40, 48)

    a = read_input(tmp_path / "rgba.png")
    assert np.array_equal(a.alpha, alpha) and np.array_equal(a.rgb, rgb)
    out = upscale_image(rgb_model, a, "rgb", 2, 0, 0)
    assert out.shape == (40, 48, 4)
    assert np.array_equal(out[:, :, :3], super_resolve(rgb_model, rgb, "rgb"))
    assert np.array_equal(out[:, :, 3], imresize(alpha, scale=2.0, output_shape=(40, 48)))
    assert np.array_equal(read_input(tmp_path / "photo.webp").rgb, rgb)


def test_cli_upscales_a_folder_with_one_call_per_image(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(_image(16, 20, seed=i)).save(folder / f"im{i}.png")
    (folder / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "out"  # created: its parent exists
    assert main(["upscale", str(folder), "--out", str(out), "--model", TINY, "--init",
                 '{"upscale": 3}', "--recipe", "fp", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["im0_x3.png", "im1_x3.png"]
    assert np.asarray(Image.open(out / "im0_x3.png")).shape == (48, 60, 3)


def test_the_seam_note_is_printed_only_when_images_are_tiled(tmp_path, capsys, monkeypatch):
    import fxquant.upscale
    monkeypatch.setattr(fxquant.upscale, "receptive_radius", lambda *a, **k: (3, False))
    good = tmp_path / "in.png"
    Image.fromarray(_image(16, 20)).save(good)
    run = ["upscale", str(good), "--out", str(tmp_path / "o.png"), "--model", TINY, "--recipe",
           "fp"]
    for tile, noted in ((None, True), (0, False)):
        assert main(run + ([] if tile is None else ["--tile", str(tile)])) == 0
        assert ("image-wide statistics" in capsys.readouterr().err) == noted, tile


def test_cli_errors(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(_image(8, 8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = ["--model", TINY, "--recipe", "fp", "--quiet"]
    cases = [
        ([str(broken), "--out", str(tmp_path / "o.png")], f"cannot read image {broken}"),
        ([str(good), "--out", str(tmp_path / "missing" / "o.png")],
         f"folder {tmp_path / 'missing'} does not exist"),
        ([str(tmp_path / "nothing.png"), "--out", str(tmp_path / "o.png")],
         "nothing.png does not exist"),
        ([str(good), "--out", str(tmp_path / "o.jpg")], "upscale writes PNG"),
        ([str(good), "--out", str(good)], "would overwrite the input"),
    ]
    for argv, message in cases:
        assert main(["upscale", *argv, *model]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxquant upscale: error: ") and message in err, err
    assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--model", TINY,
                 "--recipe", "fp", "--lower", "cpu"]) == 2
    assert "--lower needs a quantized model" in capsys.readouterr().err
    assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--model", TINY]) == 2
    assert "give --recipe" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_unreadable_inputs_and_bad_tiling_are_named_before_compiling(tmp_path, capsys,
                                                                     monkeypatch):
    """A recipe can take minutes to compile: an input that is not an image (given, or in a
    folder) and a --tile/--overlap pair without an interior are refused first."""
    import fxquant.upscale

    def compiled_anyway(args):
        raise AssertionError("compiled before the inputs were checked")

    monkeypatch.setattr(fxquant.upscale, "sr_function", compiled_anyway)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_image(8, 8)).save(folder / "a.png")
    (folder / "b.png").write_text("a text file named like an image")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    good = folder / "a.png"
    model = ["--model", TINY, "--recipe", "mse-w8a8", "--quiet"]
    for argv, message in [
        ([str(text), "--out", str(tmp_path / "o.png")], f"cannot read image {text}"),
        ([str(folder), "--out", str(tmp_path / "out")], f"cannot read image {folder / 'b.png'}"),
        ([str(good), "--out", str(tmp_path / "o.png"), "--tile", "20", "--overlap", "10"],
         r"--tile 20 must be larger than 2 × --overlap (20)"),
    ]:
        assert main(["upscale", *argv, *model]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxquant upscale: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.data
def test_flags_a_compiled_file_overrides_are_refused(data, tmp_path, capsys):
    saved = str(tmp_path / "tiny.fxq")
    own = ["--model", TINY, "--init", '{"upscale": 2}']
    assert main(["compile", *own, "--recipe", "minmax-w8a8", "--out", saved]) == 0
    good = tmp_path / "in.png"
    Image.fromarray(_image(16, 20)).save(good)
    capsys.readouterr()
    for flags, says in ((["--recipe", "mse-w4a4"], "--recipe cannot go with --compiled"),
                        (["--scale", "3"], "--scale 3 does not match")):
        assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--compiled",
                     saved, *own, *flags, "--quiet"]) == 2
        assert says in capsys.readouterr().err
    assert main(["upscale", str(good), "--out", str(tmp_path / "o.png"), "--compiled", saved,
                 *own, "--quiet"]) == 0
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (32, 40, 3)


@pytest.mark.data
def test_upscale_equals_eval_output_bit_for_bit_on_set5(data, tmp_path):
    """IMDN x4 float and FSRCNN x4 (Y channel) on Set5 'baby': the PNG fxquant upscale writes
    is the image fxquant eval scores (for FSRCNN: its Y plane, chroma bicubic)."""
    from fxquant.models import build_model

    lr_path = data / "benchmark" / "Set5" / "LR_bicubic" / "X4" / "babyx4.png"
    out = tmp_path / "baby.png"
    assert main(["upscale", str(lr_path), "--out", str(out), "--model", "imdn", "--scale",
                 "4", "--recipe", "fp", "--quiet", "--data", str(data)]) == 0
    lr = load_image(lr_path)
    expected = super_resolve(build_model("imdn", 4, pretrained=True, data_root=data), lr, "rgb")
    assert np.array_equal(np.asarray(Image.open(out)), expected)

    fsrcnn = build_model("fsrcnn", 4, pretrained=True, data_root=data)
    y = upscale_tiled(fsrcnn, to_y_tensor(lr), 4, 512, 20)
    assert np.array_equal(y.astype(np.float64), super_resolve(fsrcnn, lr, "y"))
