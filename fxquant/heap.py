"""Keep freed memory on the C heap while training or running a lowered model on the CPU.

A training step allocates and frees the same large blocks (activations saved for backward,
their gradients) every step. glibc's malloc serves a block over its mmap threshold (at most
32 MB) with a fresh ``mmap`` and gives it back on ``free``, so every step faults in every page
of those blocks again: on a 2-core AMD EPYC Zen 3 an IMDN ×4 QAT run spent 31 s in the kernel
against 83 s of user time, and its steps ran 1.31× slower than with the blocks kept
(docs/performance.md, "Training with freed blocks kept on the heap"). An inference forward
does the same with its feature maps: a lowered IMDN ×4 at 256² faulted in 130 000 pages per
forward (docs/performance.md, "Page faults"), so the ``lower`` pass for the ``cpu`` target and
``fxquant bench`` set it too. Raising the mmap and trim thresholds keeps the blocks on the heap
for reuse, as the ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` environment variables
would, but without asking the user to set them before the process starts.

The setting is process-wide and only raises how much freed memory the process may keep: blocks
up to :data:`THRESHOLD` bytes come from the heap, and the heap's free top is never trimmed.
A trim threshold of 1 GiB was not enough: lowered EDSR-baseline ×4 at 256², whose HR maps
take 256 MB each, gave more than that back after every forward and faulted it in again on
the next (docs/performance.md, "The concat's codes piece by piece, and the heap's top
kept"; ``tests/test_heap.py``). It changes no result. It is skipped where the C library is not
glibc, where the user chose malloc settings already (``MALLOC_*`` or ``GLIBC_TUNABLES`` in the
environment: :func:`malloc_settings`), and with ``FXQUANT_KEEP_HEAP=0``.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping

THRESHOLD = 1 << 30  # bytes: mallopt takes an int, and no SR training block comes near 1 GiB
NEVER_TRIM = -1  # M_TRIM_THRESHOLD -1: "disables trimming completely" (mallopt(3))
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
OFF_SWITCH = "FXQUANT_KEEP_HEAP"

_applied: bool | None = None  # None: not tried yet; then whether the thresholds were set


def malloc_settings(env: Mapping[str, str]) -> list[str]:
    """The names in ``env`` that set glibc's malloc (``MALLOC_*``, ``GLIBC_TUNABLES``):
    where the user chose them, :func:`keep_freed_blocks` leaves malloc alone."""
    return [key for key in env if key.startswith("MALLOC_") or key == "GLIBC_TUNABLES"]


def keep_freed_blocks() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True when they are set (now
    or by an earlier call)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OFF_SWITCH, "1") == "0" or malloc_settings(os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
    return _applied


def freed_blocks_kept() -> bool:
    """Whether :func:`keep_freed_blocks` set the thresholds in this process (no side effect)."""
    return bool(_applied)
