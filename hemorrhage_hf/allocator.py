"""Keep the C allocator from hoarding freed memory during long measurements (glibc on Linux).

glibc serves blocks above its mmap threshold with ``mmap`` and returns them to the system when freed, but it raises
that threshold to the size of each such block freed (up to 32 MB). After the first few-MB temporaries of a run are
freed, every later one comes from the heap, and interleaved long-lived allocations keep the heap from shrinking: peak
RSS then climbs with corpus length although the engine keeps nothing per window. Fixing the threshold at glibc's
initial 128 KiB stops the climb: SmolLM2 vs int4-g64 on 24k tokens peaked at 1.86 × the two models' weights
with the adaptive threshold and at 1.26 × with it fixed (BENCHMARKS.md, "Peak memory").

The setting is process-wide, so the command line and the Space make it, not the library on import; a
``MALLOC_MMAP_THRESHOLD_`` the user set is left alone.

Example:
    >>> from hemorrhage_hf.allocator import release_freed_memory_promptly
    >>> release_freed_memory_promptly()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameter number of M_MMAP_THRESHOLD in glibc's malloc.h.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024


def release_freed_memory_promptly() -> bool:
    """Fix glibc's mmap threshold at 128 KiB; False where there is no glibc or the user chose a threshold."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
