"""Small helpers shared by the package: boolean flags from the command line, atomic file writes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = ["as_bool", "atomic_path", "atomic_open", "read_json_object", "unused_path", "write_json_atomic"]

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", "none", "null", ""}


def as_bool(value: Any, name: str = "value") -> bool:
    """Interpret a flag given as bool, number or string (``--amp true`` on the bundle command line arrives as the
    string ``"true"``, which plain ``bool()`` would also turn ``"false"`` into ``True``)."""
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on error it is
    removed. A reader (or a crash) never sees a half-written file. ``suffix`` keeps writers that choose the
    format from the extension happy (e.g. ``.nii.gz``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open()`` for writing through :func:`atomic_path` (text mode defaults to UTF-8); flushed and fsynced."""
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Pretty-printed UTF-8 JSON, written atomically."""
    with atomic_open(path) as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return Path(path)


def unused_path(path: str | os.PathLike) -> Path:
    """``path`` if nothing is there yet, else the first free ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ...

    For outputs named by default (e.g. a benchmark's ``<name>_<device>_<date>.json``), so that a second run on the
    same day keeps the first one's results instead of replacing them.
    """
    p = Path(path)
    n = 2
    candidate = p
    while candidate.exists():
        candidate = p.with_name(f"{p.stem}_{n}{p.suffix}")
        n += 1
    return candidate


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Load a JSON object, with errors that name ``what`` and the file (a bare JSONDecodeError names neither).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid JSON, or not a JSON object.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} does not exist.")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {str(p)!r} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(p)!r} must hold a JSON object, got {type(data).__name__}.")
    return data
