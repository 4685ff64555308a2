"""Plumbing shared by caches kept beside the database (posting-list bitmaps, the ANN index).

The discipline, as the ranking cache's (rankcache.py): a meta file `<db>.<kind>.json` names
the database it was built from (`db.id`, so a swapped database is another) and the change-log
seq it reflects (a restored backup is older than its cache: never used), plus the data file
`<db>.<kind>-<stamp>.<ext>` it describes. Data files are written whole and atomically before
the meta that names them, so readers see the old cache or the new one; the replaced data file
is removed after the new meta is in place. Writers hold `<db>.<kind>.lock`. A cache that
cannot be written is skipped with one logged reason: search stays exact from SQLite.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from tagd.index import changes
from tagd.index.atomic import write_atomic

log = logging.getLogger(__name__)
DATA_KEYS = ("file", "ids", "journal", "journal_keys")  # meta keys that name data files
_warned: set[str] = set()


def meta_path(db_path: str | Path, kind: str) -> Path:
    return Path(f"{db_path}.{kind}.json")


def read_meta(db_path: str | Path, kind: str, fmt: int) -> dict[str, Any] | None:
    """The meta of this kind and format, or None (absent, unreadable, another format)."""
    try:
        meta = json.loads(meta_path(db_path, kind).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        return None
    return meta


def usable(meta: dict[str, Any], conn: sqlite3.Connection) -> bool:
    """Built from this database, and not from a later state of it (a restored backup)."""
    try:
        return meta["db_id"] == changes.db_id(conn) and int(meta["seq"]) <= changes.current_seq(
            conn
        )
    except (KeyError, TypeError, ValueError):
        return False


def folder_mode(db_path: str | Path) -> int:
    """Cache files readable by whoever may read the database's folder."""
    return os.stat(Path(db_path).parent).st_mode & 0o664


def write_data(
    db_path: str | Path, kind: str, ext: str, write: Callable[[IO[bytes]], object]
) -> str:
    """A new data file beside the database; returns its name (for the meta)."""
    name = f"{Path(db_path).name}.{kind}-{time.time_ns()}.{ext}"
    write_atomic(Path(db_path).parent / name, write, mode=folder_mode(db_path))
    return name


def write_meta(db_path: str | Path, kind: str, meta: dict[str, Any]) -> None:
    data = json.dumps(meta).encode()
    target = meta_path(db_path, kind)
    write_atomic(target, lambda fh: fh.write(data), mode=folder_mode(db_path))


def replace(db_path: str | Path, kind: str, meta: dict[str, Any], old_file: str | None) -> None:
    """Publish `meta`, then remove the data files it replaced: `old_file`, and those the
    previous meta named whatever its format, so a tagd that changed a cache's format does
    not leave the old data file (a gigabyte for an HNSW index at 1M) behind."""
    prefix = Path(db_path).name + "."
    named = [n for n in _named(db_path, kind) if n == Path(n).name and n.startswith(prefix)]
    write_meta(db_path, kind, meta)
    keep = {meta.get(key) for key in DATA_KEYS}
    for name in {old_file, *named} - keep:
        if name:
            (Path(db_path).parent / name).unlink(missing_ok=True)


def _named(db_path: str | Path, kind: str) -> list[str]:
    """The data files the current meta names, read without checking its format."""
    try:
        raw = json.loads(meta_path(db_path, kind).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(raw, dict):
        return []
    return [v for v in (raw.get(key) for key in DATA_KEYS) if isinstance(v, str)]


@contextmanager
def locked(db_path: str | Path, kind: str) -> Iterator[bool]:
    """Serialise writers (daemon, scan); yields False when the lock cannot be taken."""
    try:
        fd = os.open(f"{db_path}.{kind}.lock", os.O_RDWR | os.O_CREAT, 0o660)
    except OSError as exc:
        not_written(kind, db_path, exc)
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)


def not_written(kind: str, db_path: str | Path, exc: OSError) -> None:
    """One warning per cache and process: the cache is skipped, search stays exact."""
    key = f"{kind}:{db_path}"
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "the %s cache beside %s cannot be written (%s); searches read SQLite instead. "
        "Make the database's folder writable for tagd",
        kind,
        db_path,
        exc.strerror or type(exc).__name__,
    )
