"""fxquant.heap: training keeps freed large blocks on glibc's heap instead of faulting them in
again every step, and leaves the user's own malloc settings alone."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from fxquant.heap import malloc_settings

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the thresholds are glibc's")

# a 40 MB block (over glibc's largest dynamic mmap threshold, 32 MB) allocated, touched and
# freed 16 times, as a training step does with its activations; minor page faults per round
PROBE = """
import json, resource, sys, torch
from fxquant.heap import keep_freed_blocks
applied = keep_freed_blocks()
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(10_000_000)
    block.fill_(1.0)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in malloc_settings(os.environ)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_are_reused_without_page_faults():
    kept, default = probe(), probe(FXQUANT_KEEP_HEAP="0")
    assert kept["applied"] is True and default["applied"] is False
    # glibc's thresholds: every round maps a fresh block and faults it in (page by page, or
    # per huge page where transparent huge pages are always on) ...
    assert all(faults > 0 for faults in default["faults"][-8:])
    # ... kept on the heap, the block is reused and no page is touched anew
    assert sum(kept["faults"][-8:]) < 0.01 * sum(default["faults"][-8:])


# three 400 MB blocks allocated, touched and freed last-first, as a forward at a large output
# size does with its HR feature maps: more than 1 GiB freed at the top of the heap at once
LARGE = """
import json, resource, torch
from fxquant.heap import keep_freed_blocks
applied = keep_freed_blocks()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(100_000_000) for _ in range(3)]
    for block in blocks:
        block.fill_(1.0)
    del block
    while blocks:
        blocks.pop()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def test_more_than_a_gibibyte_freed_at_once_is_kept():
    """The heap's top is never trimmed: with the 1 GiB trim threshold fxquant set before,
    this probe gave all three blocks back to the system every round and faulted them in again
    (292 936 pages a round)."""
    clean = {k: v for k, v in os.environ.items() if k not in malloc_settings(os.environ)}
    out = subprocess.run([sys.executable, "-c", LARGE], env={**clean, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] is True
    assert result["faults"][0] > 1000  # the first round faults the blocks in ...
    assert sum(result["faults"][-3:]) < 0.01 * result["faults"][0]  # ... then they stay


def test_the_users_own_malloc_settings_win():
    assert probe(MALLOC_ARENA_MAX="2")["applied"] is False
    assert probe(GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000")["applied"] is False


LOWER = """
import json, torch
import fxquant
from fxquant.heap import freed_blocks_kept
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 3, 3, padding=1)).eval()
fake = fxquant.compile(model, "minmax-w8a8", calib=torch.rand(2, 3, 16, 16))
before = freed_blocks_kept()
fxquant.lowered_copy(fake, "reference")
after_reference = freed_blocks_kept()
fxquant.lowered_copy(fake, "cpu")
print(json.dumps([before, after_reference, freed_blocks_kept()]))
"""


@pytest.mark.parametrize("env, expected", [({}, [False, False, True]),
                                           ({"FXQUANT_KEEP_HEAP": "0"}, [False, False, False])])
def test_lowering_for_the_cpu_keeps_freed_blocks_unless_switched_off(env, expected):
    """A lowered cpu model runs in the process that lowered it: the lower pass keeps freed
    blocks for it (an SR forward's feature maps are the training step's large blocks again);
    calibration alone and the reference target leave malloc alone."""
    clean = {k: v for k, v in os.environ.items() if k not in malloc_settings(os.environ)}
    out = subprocess.run([sys.executable, "-c", LOWER], env={**clean, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
