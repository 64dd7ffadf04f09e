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
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import HemorrhageError


def _final_mode(path: Path) -> int:
    """The permissions the written file gets: an existing file's own, else what the umask gives a new file.

    (The temporary file is created 0600; left so, a report or a rewritten model card would be unreadable to others.)
    """
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` (keeping ``path``'s permissions, or giving a
    new file the umask's), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, _final_mode(path))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def json_safe(value):
    """JSON has no inf/NaN: non-finite numbers become null, in nested dicts and lists too.

    Example:
        >>> json_safe({"ppl_ratio": float("inf"), "levels": [1.0, float("nan")]})
        {'ppl_ratio': None, 'levels': [1.0, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | Path, data) -> None:
    """Write ``data`` as indented JSON (non-finite numbers as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n")


def read_json(
    path: str | Path, *, missing: str, error: type[HemorrhageError] = HemorrhageError, kind: str = "valid JSON"
):
    """The JSON document in ``path``; ``error(missing)`` where there is no such file, and an ``error`` naming the
    file and the parse problem where it is not ``kind``.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "figures.json"
        >>> write_json(path, {"kl_mean": 0.5})
        >>> read_json(path, missing="no figures")
        {'kl_mean': 0.5}
    """
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as problem:
        raise error(f"{path} is not {kind}: {problem}") from problem
