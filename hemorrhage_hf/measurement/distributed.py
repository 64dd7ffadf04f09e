"""Data-parallel measurement under 🤗 Accelerate (``accelerate launch -m hemorrhage_hf.cli report ...``).

Windows are split into contiguous shards, one per process, on batch boundaries, so every process forms exactly the
batches a single process would. After the pass, each process's per-token arrays and per-batch layer sums are
gathered in rank order: the merged arrays are the single-process arrays, token for token, so percentiles are exact
(no mergeable sketch, no error to state) and every window is counted once, whatever the split. In one process
(plain ``python``/``hemorrhage-hf``) all of this is a no-op.

Launch on CPUs with ``accelerate launch --multi_gpu --num_processes N`` (torch's elastic launcher; gloo on CPU) or
``torchrun --nproc_per_node N``: ``accelerate launch --cpu --num_processes N`` without an MPI host file starts one
process. The main process prints ``data-parallel over N processes`` to stderr when the launch worked.

Example:
    >>> from hemorrhage_hf.measurement.distributed import shard_bounds
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
    import sys

    from accelerate import PartialState

    state = PartialState(cpu=True)
    if state.is_main_process:
        # Says the launch worked: `accelerate launch --cpu --num_processes 2` quietly starts a single process.
        print(f"hemorrhage-hf: data-parallel over {state.num_processes} processes ({state.backend})", file=sys.stderr)
    return state


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


def local_bounds(n_windows: int, batch_size: int) -> tuple[int, int]:
    """This process's ``(start, stop)`` window range (all of them in a single process)."""
    if n_processes() == 1:
        return 0, n_windows
    return shard_bounds(n_windows=n_windows, batch_size=batch_size, n_processes=n_processes())[rank()]


def local_windows(windows: Sequence[T], batch_size: int) -> Sequence[T]:
    """This process's share of ``windows`` (all of them in a single process)."""
    start, stop = local_bounds(len(windows), batch_size)
    return windows[start:stop]


def gather(value: T) -> list[T]:
    """``value`` from every process, in rank order (``[value]`` in a single process)."""
    if n_processes() == 1:
        return [value]
    import torch.distributed

    gathered: list = [None] * n_processes()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every process gets here (nothing in a single process)."""
    if n_processes() > 1:
        import torch.distributed

        torch.distributed.barrier()
