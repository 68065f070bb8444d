"""Keep freed memory in the process, so that each step's large arrays reuse it.

glibc's ``malloc`` serves every block above its mmap threshold (128 KB to
32 MB) with a fresh ``mmap`` and hands it back to the kernel on ``free``. A
training step makes many such blocks: TensorFlow's activations and gradients,
the optimiser's vectors (ResNet-50's weights are 189 MB in float64). Each new
block then costs a page fault and a zeroed page for every 4 KB it touches. On
ResNet-50 with 2 ranks of a 2-core machine that was about half of every step:
Adam 2.24 s a step against 1.40 s with freed memory kept, K-FAC 3.4-3.7 s
against 1.9 s (``docs/benchmarks.md``).

:func:`reuse_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (large blocks come
from the heap too) and raises ``M_TRIM_THRESHOLD`` (freed memory stays in the
process), with ``mallopt``: the same numbers, only where they live. The
process's resident memory then stays near its peak, as a training job's does
anyway. numpy only; no TensorFlow, no MPI.

That holds for the main thread's allocations. Every other thread that
allocates gets an arena of its own, whose heaps hold at most 64 MB: a larger
block there is still a fresh ``mmap`` each time. :func:`single_arena` makes
every thread allocate from the main one, for a process whose large arrays
are made in threads (``python -m mpinewton.compare --interleave``).
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

__all__ = ["MALLOC_ENV", "reuse_freed_memory", "single_arena"]

#: glibc's own environment variables for these settings: where one is set, the
#: user has chosen, and :func:`reuse_freed_memory` leaves the allocator alone.
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP = 2**31 - 1  # bytes of free memory at the heap's top kept before trimming (the most)


def _mallopt() -> Any | None:
    """The C library's ``mallopt(param, value)`` on Linux with glibc; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse; True where it now does.

    False where the C library is not glibc (no ``mallopt``), the platform is
    not Linux, or one of :data:`MALLOC_ENV` is set. Affects the blocks
    allocated after the call; call it before the first large ones.
    """
    if any(name in os.environ for name in MALLOC_ENV) or (mallopt := _mallopt()) is None:
        return False
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP) == 1


def single_arena() -> bool:
    """Have every thread allocate from glibc's main arena; True where it now does.

    In a thread's own arena, a block above 64 MB is a fresh ``mmap`` and its
    page faults at every allocation, whatever :func:`reuse_freed_memory` set:
    ResNet-50's Adam steps taken in turns in threads took 3.87 s (median)
    against 2.93 s in the main thread, and 2.85 s with one arena (2 ranks on
    2 cores; ``docs/compare/step-setup/``). Call it before
    any other thread allocates (before TensorFlow starts its pools). False
    where ``MALLOC_ARENA_MAX`` is set (the user's choice), or as
    :func:`reuse_freed_memory`.
    """
    if "MALLOC_ARENA_MAX" in os.environ or (mallopt := _mallopt()) is None:
        return False
    return mallopt(_M_ARENA_MAX, 1) == 1
