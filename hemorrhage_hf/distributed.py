"""Data-parallel measurement under 🤗 Accelerate (``accelerate launch -m hemorrhage_hf.cli report ...``).

Windows are split into contiguous shards, one per process, on batch boundaries, so every process forms exactly the
batches a single process would. After the pass, each process's per-token arrays and per-batch layer sums are
gathered in rank order: the merged arrays are the single-process arrays, token for token, so percentiles are exact
(no mergeable sketch, no error to state) and every window is counted once, whatever the split. In one process
(plain ``python``/``hemorrhage-hf``) all of this is a no-op.

Example:
    >>> from hemorrhage_hf.distributed import shard_bounds
    >>> shard_bounds(n_windows=10, batch_size=2, n_processes=3)  # 5 batches over 3 processes
    [(0, 4), (4, 8), (8, 10)]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


@functools.cache
def _state():
    from accelerate import PartialState

    return PartialState(cpu=True)


def _is_launched() -> bool:
    """True under ``accelerate launch``/``torchrun`` with more than one process."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def n_processes() -> int:
    return _state().num_processes if _is_launched() else 1


def rank() -> int:
    return _state().process_index if _is_launched() else 0


def is_main_process() -> bool:
    return rank() == 0


def shard_bounds(*, n_windows: int, batch_size: int, n_processes: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` window ranges, one per process, cut on batch boundaries (uneven is fine)."""
    n_batches = -(-n_windows // batch_size)
    per_process, extra = divmod(n_batches, n_processes)
    bounds, start = [], 0
    for index in range(n_processes):
        batches = per_process + (1 if index < extra else 0)
        stop = min(start + batches * batch_size, n_windows)
        bounds.append((start, stop))
        start = stop
    return bounds


def local_windows(windows: Sequence[T], batch_size: int) -> Sequence[T]:
    """This process's share of ``windows`` (all of them in a single process)."""
    if n_processes() == 1:
        return windows
    start, stop = shard_bounds(n_windows=len(windows), batch_size=batch_size, n_processes=n_processes())[rank()]
    return windows[start:stop]


def gather(value: T) -> list[T]:
    """``value`` from every process, in rank order (``[value]`` in a single process)."""
    if n_processes() == 1:
        return [value]
    import torch.distributed

    gathered: list = [None] * n_processes()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
