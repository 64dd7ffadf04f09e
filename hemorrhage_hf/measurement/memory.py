"""Make freed memory leave the process, so its peak resident size is what is alive, not what once was.

glibc's malloc serves a block of at least its *mmap threshold* (128 KiB at start) with its own mapping and unmaps it
when freed. But each time such a block is freed it raises the threshold to that block's size (up to 32 MiB) and the
heap's trim threshold to twice that: from then on blocks of that size come from the heap, and freed heap space stays
in the process. Measuring allocates many temporaries of a few megabytes per window (16 rows of full-vocabulary
log-probabilities: ~3 MB each for a 49k vocabulary), spread over the threads torch computes on; measured on
SmolLM2-135M in sequential mode, the heap kept ~300 MB more than was alive after one window, half a model's weights.
:func:`return_large_blocks` fixes the threshold instead: blocks of 1 MiB or more are mapped and unmapped every time.

Elsewhere than glibc (macOS, musl) both functions do nothing but collect garbage.

Example (``return_large_blocks`` is not shown running: it changes malloc for the rest of the process):
    >>> from hemorrhage_hf.measurement.memory import release_freed_memory
    >>> release_freed_memory()
"""

from __future__ import annotations

import ctypes
import gc
import platform
from functools import cache

#: mallopt's parameter number for the mmap threshold (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
#: Blocks this large or larger are mapped on allocation and unmapped when freed. A page fault per 4 KiB of them is
#: the price; per block it stays small against the full-vocabulary arithmetic that fills it.
LARGE_BLOCK_BYTES = 1 << 20


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve every block of ``threshold`` bytes or more with its own mapping, returned to the system when freed,
    for the rest of the process (glibc then never raises the threshold again). True where it took effect."""
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def release_freed_memory() -> None:
    """Collect garbage (a model freed in a reference cycle goes now, not at some later collection), then hand the
    free pages of every malloc arena back to the system."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
