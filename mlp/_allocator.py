"""Keep glibc from returning every large temporary array to the kernel.

glibc serves allocations above M_MMAP_THRESHOLD (128 KiB at first) with a
fresh mmap and gives them back with munmap on free, so a training loop whose
activations are a few hundred KiB pays a system call and a page fault per
touched page on every array, every step: measured here, a third of the
spiral net's training time was spent in the kernel. Raising the thresholds
keeps freed arrays in the heap for reuse. Nothing happens off glibc.

It changes the whole process's allocator, so importing nnx does not do it:
training does (mlp.train.train, once per process), and ``NNX_MALLOC_TUNING=0``
turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 64 << 20     # arrays up to 64 MiB come from the reusable heap
TRIM_THRESHOLD_BYTES = 256 << 20    # free heap kept before giving memory back
TUNING_ENV = "NNX_MALLOC_TUNING"

_done: bool | None = None


def tuning_enabled() -> bool:
    """False when ``NNX_MALLOC_TUNING`` is 0, off, false or no."""
    return os.environ.get(TUNING_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def keep_freed_arrays_in_the_heap() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process, unless turned off;
    True when it took effect."""
    global _done
    if _done is None:
        _done = tuning_enabled() and _mallopt()
    return _done


def _mallopt() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
