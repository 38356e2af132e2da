"""Streamed calibration: a map-style source of batches is read one batch at a time by every
pass (never materialized), compiles to exactly what the same data in memory compiles to —
reconstruction included — and bad batches are named when they are read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxquant
from fxquant.calibration import LazyBatches, as_batches, prepare_calibration
from fxquant.data.images import save_image
from fxquant.data.patches import CalibrationPatches, calibration_patches
from fxquant.errors import CalibrationError
from fxquant.recipe import load_preset

pytestmark = pytest.mark.usefixtures("one_thread")

RECON = "trace,observe,calibrate,quantize,reconstruct{steps=20,eval_every=10,patience=10},verify"


class Source:
    """Batches made on every read (as a loader cutting them from files would), counting the
    reads."""

    def __init__(self, data: torch.Tensor, batch: int = 4):
        self.data, self.batch = data, batch
        self.reads = 0

    def __len__(self):
        return -(-len(self.data) // self.batch)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        self.reads += 1
        return self.data[i * self.batch:(i + 1) * self.batch].clone()


@pytest.mark.parametrize("recipe, pipeline", [
    ("minmax-w4a4", None), ("mse-w4a4", None), ("minmax-w4a4", RECON),
    ("minmax-w4a4", RECON.replace("patience=10}", "patience=10,granularity=block}"))])
def test_a_streamed_source_compiles_like_the_same_batches_in_memory(tiny_sr, calib, recipe,
                                                                     pipeline):
    in_memory = fxquant.compile(tiny_sr, recipe, calib=list(calib.split(4)), pipeline=pipeline)
    source = Source(calib)
    streamed = fxquant.compile(tiny_sr, recipe, calib=source, pipeline=pipeline)
    a, b = in_memory.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert source.reads > len(source)  # read batch by batch, by several passes


def test_streamed_batches_are_a_lazy_sequence_and_bad_ones_are_named():
    data = torch.rand(10, 3, 8, 8)
    source = Source(data)
    batches = prepare_calibration(source)
    assert isinstance(batches, LazyBatches) and len(batches) == 3 and source.reads == 3
    tail = batches[1:]
    assert isinstance(tail, LazyBatches) and len(tail) == 2
    assert torch.equal(tail[-1][0], data[8:]) and as_batches(batches) is batches
    data[5, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="calibration batch 1 contains 1 NaN"):
        batches[1]
    with pytest.raises(CalibrationError, match="calibration data is empty"):
        as_batches(Source(torch.rand(0, 3, 8, 8)))
    with pytest.raises(CalibrationError, match="batch 0 has dtype uint8"):
        prepare_calibration(Source((torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)))


@pytest.fixture
def image_root(tmp_path):
    rng = np.random.default_rng(2)
    for i, size in enumerate([(40, 36), (50, 44), (34, 60)]):
        save_image(tmp_path / "train" / "Noise" / "HR" / f"{i}.png",
                   rng.integers(0, 256, size + (3,), np.uint8))
    return tmp_path


@pytest.mark.parametrize("color", ["rgb", "y"])
def test_calibration_patches_stream_the_same_patches(image_root, color):
    whole = calibration_patches(11, 8, 2, sets=("Noise",), root=image_root, seed=4, color=color)
    source = CalibrationPatches(11, 8, 2, sets=("Noise",), root=image_root, seed=4, color=color,
                                batch_size=4, cache_images=1)
    assert len(source) == 3 and [len(source[i]) for i in range(3)] == [4, 4, 3]
    assert torch.equal(torch.cat([source[i] for i in range(len(source))]), whole)
    assert torch.equal(source[-1], whole[8:])
    with pytest.raises(IndexError):
        source[3]


def test_the_recipe_streams_zoo_calibration(image_root, tiny_sr):
    from fxquant.workflow import calibration_data

    recipe = load_preset("minmax-w4a4")
    recipe.calibration.sets, recipe.calibration.num_patches = ["Noise"], 12
    recipe.calibration.patch_size = 8
    spec = type("Spec", (), {"color": "rgb", "value_range": 1})()
    whole = calibration_data(spec, 2, recipe, image_root)
    recipe.calibration.stream = True
    streamed = calibration_data(spec, 2, recipe, image_root)
    assert isinstance(streamed, CalibrationPatches) and len(streamed) == 2
    a = fxquant.compile(tiny_sr, recipe, calib=whole).state_dict()
    b = fxquant.compile(tiny_sr, recipe, calib=streamed).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    spec.value_range = 255
    scaled = calibration_data(spec, 2, recipe, image_root)
    assert torch.equal(scaled[1], streamed[1] * 255)
