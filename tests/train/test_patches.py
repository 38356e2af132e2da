"""The QAT patch sampler: one generator state fixes the batch, ranks' slices are disjoint
and together the global batch, LR patches are crops of the MATLAB-bicubic LR aligned with
their HR patches, and augmentation applies one flip/rotation to both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fxquant.data.imresize import bicubic_downscale, mod_crop
from fxquant.train.config import TrainError
from fxquant.train.data import PatchSampler

from qat_helpers import images


def draw(s: PatchSampler, seed: int, lo=0, hi=None, batch=6):
    return s.sample(batch, torch.Generator().manual_seed(seed), lo, hi)


def test_same_state_same_batch_and_shards_make_the_global_batch():
    s = PatchSampler(images(), 2, 8)
    lr, hr = draw(s, 4)
    again = draw(s, 4)
    assert torch.equal(lr, again[0]) and torch.equal(hr, again[1])
    parts = [draw(s, 4, lo, lo + 2) for lo in (0, 2, 4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), lr)
    assert torch.equal(torch.cat([p[1] for p in parts]), hr)
    assert not torch.equal(draw(s, 5)[0], lr)
    assert lr.shape == (6, 3, 8, 8) and hr.shape == (6, 3, 16, 16)
    assert lr.dtype == torch.float32 and 0 <= float(lr.min()) and float(lr.max()) <= 1


def find(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    p = needle.shape[0]
    return [(t, l) for t in range(haystack.shape[0] - p + 1)
            for l in range(haystack.shape[1] - p + 1)
            if np.array_equal(haystack[t:t + p, l:l + p], needle)]


def test_lr_patches_are_bicubic_lr_crops_aligned_with_hr():
    image = images(1, seed=7)[0]
    s = PatchSampler([image], 2, 6, augment=False)
    hr_full = mod_crop(image, 2)
    lr_full = bicubic_downscale(hr_full, 2)
    lr, hr = draw(s, 1, batch=4)
    for row in range(4):
        lr_u8 = np.rint(lr[row].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        hr_u8 = np.rint(hr[row].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        spots = find(lr_full, lr_u8)
        assert any(np.array_equal(hr_full[2 * t:2 * t + 12, 2 * l:2 * l + 12], hr_u8)
                   for t, l in spots)


def test_augmentation_is_one_of_eight_and_the_same_for_lr_and_hr():
    plain = PatchSampler(images(), 2, 8, augment=False)
    augmented = PatchSampler(images(), 2, 8, augment=True)
    lr0, hr0 = draw(plain, 2, batch=16)
    lr1, hr1 = draw(augmented, 2, batch=16)
    transforms = [lambda t: t, lambda t: t.flip(-1), lambda t: t.flip(-2),
                  lambda t: t.flip(-1).flip(-2)]
    transforms += [lambda t, f=f: f(t).transpose(-1, -2) for f in list(transforms)]
    used = set()
    for row in range(16):
        hits = [i for i, f in enumerate(transforms)
                if torch.equal(f(lr0[row]), lr1[row]) and torch.equal(f(hr0[row]), hr1[row])]
        assert hits, row
        used.add(hits[0])
    assert len(used) > 2


def test_too_small_images_are_named():
    with pytest.raises(TrainError, match="has an x2 LR of at least 64x64 pixels; use a smaller"):
        PatchSampler(images(), 2, 64)
    with pytest.raises(TrainError, match="no training images to train on"):
        PatchSampler([], 2, 8)


@pytest.mark.data
def test_training_sets_from_the_data_root(data):
    s = PatchSampler.from_sets(("T91", "General100"), 4, 24, root=data)
    assert len(s.usable) > 150
    lr, hr = draw(s, 0, batch=4)
    assert lr.shape == (4, 3, 24, 24) and hr.shape == (4, 3, 96, 96)
