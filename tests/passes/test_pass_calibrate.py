"""``calibrate``: leaves the graph alone, feeds observers, rejects bad calibration data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxquant import CalibrationError, PassContext, PassManager, Recipe, RecipeError, compile
from fxquant.inspect import graph_table
from fxquant.observers import Observer


def test_calibrate_changes_no_structure_and_fills_observers(tiny_sr, calib):
    ctx = PassContext(Recipe(), calib=calib)
    before = PassManager("trace,observe").run(tiny_sr, PassContext(Recipe()))
    after = PassManager("trace,observe,calibrate").run(tiny_sr, ctx)
    assert graph_table(after) == graph_table(before)
    observers = [m for m in after.modules() if isinstance(m, Observer)]
    assert observers and all(m.batches == 2 for m in observers)  # 16 samples, batch size 8
    assert ctx.history[-1][1] == {"batches": 2, "samples": 16}


def test_calibrate_observes_the_float_activations(tiny_sr, calib):
    gm = PassManager("trace,observe,calibrate").run(tiny_sr, PassContext(Recipe(), calib=calib))
    observer = gm.get_submodule("blocks_0_0_input_observer")
    head_out = tiny_sr.head(calib)
    assert torch.isclose(observer.max_val, head_out.max())
    assert torch.isclose(observer.min_val, head_out.min())


def test_batches_option_limits_calibration(tiny_sr, calib):
    ctx = PassContext(Recipe(), calib=calib)
    PassManager("trace,observe,calibrate{batches=1}").run(tiny_sr, ctx)
    assert ctx.history[-1][1]["batches"] == 1


@pytest.mark.parametrize("batches", [0, -1])
def test_a_batch_count_under_one_is_refused(tiny_sr, calib, batches):
    with pytest.raises(RecipeError, match=f"calibrate.batches = {batches}: give a number"):
        PassManager(f"trace,observe,calibrate{{batches={batches}}}")


def test_nan_in_calibration_data_is_refused(tiny_sr, calib):
    calib = calib.clone()
    calib[9, 0, 3, 3] = float("nan")
    with pytest.raises(CalibrationError, match="calibration batch 1 contains 1 NaN/inf"):
        compile(tiny_sr, "minmax-w8a8", calib=calib)


@pytest.mark.parametrize("empty", [torch.empty(0, 3, 8, 8), [], iter(())])
def test_empty_calibration_set_is_refused(tiny_sr, empty):
    with pytest.raises(CalibrationError, match="empty"):
        compile(tiny_sr, "minmax-w8a8", calib=empty)


def test_missing_calibration_data_says_what_to_pass(tiny_sr):
    with pytest.raises(CalibrationError, match="pass calib="):
        compile(tiny_sr, "minmax-w8a8")


def test_wrong_batch_type(tiny_sr):
    with pytest.raises(CalibrationError, match="batch 0 is a str"):
        compile(tiny_sr, "minmax-w8a8", calib=["not a tensor"])


@pytest.mark.parametrize("batch, hint", [
    ({"lq": torch.rand(2, 3, 8, 8), "gt": torch.rand(2, 3, 16, 16)},
     r"is a dict; .*\(keys: lq, gt\); give the model's input alone, e\.g\. "
     r"\[batch\['lq'\] for batch in loader\]"),
    (np.zeros((2, 3, 8, 8), np.float32), r"is a ndarray; .*torch\.from_numpy"),
])
def test_batches_of_other_kinds_get_the_conversion_named(tiny_sr, batch, hint):
    with pytest.raises(CalibrationError, match=hint):
        compile(tiny_sr, "minmax-w8a8", calib=[batch])


def test_an_lr_hr_pair_is_recognised(tiny_sr):
    pair = (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 16, 16))
    with pytest.raises(CalibrationError, match=r"an \(LR, HR\) pair\? calibration needs the "
                                               r"LR input alone"):
        compile(tiny_sr, "minmax-w8a8", calib=[pair])


def test_batch_the_model_cannot_run_is_named_with_its_shape(tiny_sr, calib):
    # tiny_sr takes 3 channels; a 4-channel batch is the user's slip, not a pass failure
    with pytest.raises(CalibrationError, match=r"calibration batch 0 \(shape \(2, 4, 8, 8\)\) "
                                               r"does not run through the model: RuntimeError"):
        compile(tiny_sr, "minmax-w8a8", calib=[torch.rand(2, 4, 8, 8)])
