"""Make freed memory leave the process, so its peak resident size is what is alive, not what once was.

glibc's malloc serves a block of at least its *mmap threshold* (128 KiB at start) with its own mapping and unmaps it
when freed. But each time such a block is freed it raises the threshold to that block's size (up to 32 MiB) and the
heap's trim threshold to twice that: from then on blocks of that size come from the heap, and freed heap space stays
in the process. Measuring allocates many temporaries of a few megabytes per window (16 rows of full-vocabulary
log-probabilities: ~3 MB each for a 49k vocabulary), spread over the threads torch computes on; measured on
SmolLM2-135M in sequential mode, the heap kept ~300 MB more than was alive after one window, half a model's weights.
:func:`large_blocks_returned` fixes the threshold for the duration of a block of code: there blocks of 1 MiB or more
are mapped and unmapped every time. Each mapping costs page faults (kernel time), so afterwards the threshold is
fixed high (glibc's own ceiling for it, 32 MiB) and the rest of the process allocates from the heap as glibc's
adjusted threshold would have let it.

Elsewhere than glibc (macOS, musl) they return nothing to the system; :func:`release_freed_memory` still collects
garbage.

Example:
    >>> import torch
    >>> from hemorrhage_hf.measurement.memory import large_blocks_returned, release_freed_memory, return_free_pages
    >>> with large_blocks_returned():
    ...     block = torch.ones(1 << 20)  # 4 MiB: mapped, and unmapped when freed
    >>> return_free_pages()  # after each batch
    >>> release_freed_memory()  # after a model is dropped
"""

from __future__ import annotations

import ctypes
import gc
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

#: mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its self-adjusted mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_HEAP_BLOCK_CEILING = 32 << 20
#: Blocks this large or larger are mapped on allocation and unmapped when freed. A page fault per 4 KiB of them is
#: the price; per block it stays small against the full-vocabulary arithmetic that fills it.
LARGE_BLOCK_BYTES = 1 << 20


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL("libc.so.6")


@contextmanager
def large_blocks_returned(threshold: int = LARGE_BLOCK_BYTES) -> Iterator[bool]:
    """Inside, serve every block of ``threshold`` bytes or more with its own mapping, returned to the system when
    freed; on leaving, serve blocks below 32 MiB from the heap (and trim it only past twice that), as glibc's adjusted
    threshold would. Yields whether it took effect (False where malloc is not glibc's)."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield True
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCK_CEILING)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _HEAP_BLOCK_CEILING)


def return_free_pages() -> None:
    """Hand the free pages of every malloc arena back to the system, holes inside the heap included.

    Called after every measured batch: without it, the blocks a batch freed stay in the process, the next batch's
    temporaries land elsewhere, and resident memory climbs with the length of the text (BENCHMARKS.md, peak
    memory). A trim costs a walk over the arenas, small against a forward pass.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def release_freed_memory() -> None:
    """Collect garbage (a model freed in a reference cycle goes now, not at some later collection), then hand the
    free pages of every malloc arena back to the system."""
    gc.collect()
    return_free_pages()
