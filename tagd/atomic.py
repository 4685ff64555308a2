"""Replacing a file in one step: written beside it, then renamed over it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def write_atomic(
    target: Path, write: Callable[[IO[bytes]], object], *, mode: int, durable: bool = False
) -> None:
    """Readers see the old file or the new one, never part of one, and a failed write (disk
    full) leaves nothing behind. `durable` syncs the data before the rename: for the user's
    own files, not for caches that can be rebuilt."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tagd-tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
