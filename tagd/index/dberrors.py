"""SQLite errors in words a user can act on, and the daemon's record of the one it is riding out.

A full disk, a lock held past the busy timeout or an I/O error are conditions of the machine,
not bugs: commands report them in one line, and the daemon waits them out with backoff
instead of dying (under systemd, a crash loop would burn the start limit).
"""

from __future__ import annotations

import threading
import time

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 60.0


def describe(exc: BaseException, database: object | None = None) -> str:
    """One line: the database, SQLite's own words, and what to do about it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"database {database}" if database else "database"
    low = text.lower()
    if "disk is full" in low or "database or disk is full" in low:
        fix = "free space on the disk that holds it"
    elif "locked" in low or "busy" in low:
        fix = "another process holds a write lock longer than the busy timeout; stop it or retry"
    elif "disk i/o error" in low or "i/o error" in low:
        fix = "the disk or filesystem reported an I/O error: check `dmesg` and the mount"
    elif "not a database" in low:
        fix = "the file is not a tagd (SQLite) database: point `database:` at another file"
    elif "malformed" in low:
        fix = "the file is damaged: restore a backup or move it aside and run `tagd scan`"
    elif "readonly" in low or "read-only" in low:
        fix = "tagd cannot write there: check the file's and folder's permissions"
    elif "unable to open" in low:
        fix = "check that the folder exists and is writable"
    else:
        fix = "see the SQLite message"
    return f"{where}: {text}: {fix}"


class DatabaseTrouble:
    """The database error the daemon is riding out and when to try again (shared by threads).

    Only a write that always writes (the status row) clears it: a claim that finds nothing to
    claim writes nothing and would succeed on a full disk.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.error: str | None = None
        self.since: float | None = None
        self.failures = 0
        self.retry_at = 0.0

    def failed(self, exc: BaseException, database: object | None = None) -> float:
        """Record a failure; returns the seconds to wait before the next try."""
        with self._lock:
            self.failures += 1
            self.error = describe(exc, database)
            self.since = self.since or time.time()
            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (self.failures - 1))
            self.retry_at = max(self.retry_at, time.monotonic() + delay)
            return delay

    def cleared(self) -> bool:
        """A write went through; True if that ends a period of trouble."""
        with self._lock:
            was = self.error is not None
            self.error, self.since, self.failures, self.retry_at = None, None, 0, 0.0
            return was

    def waiting(self) -> float:
        """Seconds left before the next try (0 when there is no trouble or it is time)."""
        with self._lock:
            if self.error is None:
                return 0.0
            return max(0.0, self.retry_at - time.monotonic())

    @property
    def active(self) -> bool:
        return self.error is not None
