"""Replacing a file in one step: written beside it, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (/proc), since
    setting it to read it races with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(
    target: Path, write: Callable[[IO[bytes]], object], *, mode: int, durable: bool = False
) -> None:
    """Readers see the old file or the new one, never part of one, and a failed write (disk
    full) leaves nothing behind. `durable` syncs the data before the rename: for the user's
    own files, not for caches that can be rebuilt. `mode` is narrowed by the umask, as
    `open()` would."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tagd-tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
