"""Atomic file output: a write goes to a temporary file beside the target, then is renamed over it, so an
interrupted run (SIGINT, a crash) never leaves a half-written report, plot or cache behind.

Example:
    >>> import tempfile, pathlib
    >>> from hemorrhage_hf.atomic import atomic_write_text
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "report.json"
    >>> atomic_write_text(path, "{}")
    >>> path.read_text()
    '{}'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
