"""Keep freed memory in the process between train steps (Linux, glibc's malloc), instead of returning it to the system.

glibc hands an allocation above its mmap threshold to the kernel as fresh pages and gives freed memory at the top of
its heap back once more than its trim threshold lies free. A train step on the CPU allocates and frees tensors of
tens of MB each time (scores, patterns, gradients, Adam's temporaries), so each step faults those pages in again,
zeroed by the kernel: 14K-36K page faults a step at `scripts/bench.py`'s configs b and a, about a tenth of the step
(BENCHMARKS.md, "Freed memory"). With both thresholds raised, freed blocks are reused and a step faults in no page.
The process then keeps its peak, which it reaches every step anyway.

The training command calls `keep_freed_memory` just before its first step, so that what its start frees (the host's
load, the calibration) goes back; a script of one's own can call it too. A user's own MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ (glibc's environment variables for the same settings) wins.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BYTES = 1 << 30  # allocations up to 1 GiB come from the heap, and up to 1 GiB of it may lie free
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to `keep_bytes` for this process; whether it did (not on another
    system or C library, nor where the user set either threshold in the environment)."""
    if not 0 < keep_bytes < 2**31:  # mallopt takes a C int
        raise ValueError(f"keep_bytes must be in (0, 2**31), got {keep_bytes}.")
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, its C library's among them
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: another C library's mallopt means something else
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, keep_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, keep_bytes))
