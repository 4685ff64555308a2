"""Watch the gallery roots and turn filesystem events into queue and path-table changes.

Observer threads only append `(event type, src, dest)` to an in-memory queue, so they never
block on the database and cannot die from a handler error. One writer thread applies the
events in short transactions, waits until new files stop changing (settle time), and checks
every root: a root that disappears or is replaced (an unmounted disk) is unwatched and left as
it is in the index, then watched and reconciled when it comes back.
"""

from __future__ import annotations

import errno
import logging
import os
import queue as stdqueue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from tagd import db, queue
from tagd.config import Config, WatchRoot
from tagd.filters import excluded, wanted
from tagd.scanner import under

log = logging.getLogger(__name__)

# No open/close-nowrite events: tagd's own reads of the images must not come back as events.
INOTIFY_EVENTS: list[type[FileSystemEvent]] = [
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
# Polling sees no close events; a modification restarts the settle clock instead.
POLLING_EVENTS: list[type[FileSystemEvent]] = [*INOTIFY_EVENTS, FileModifiedEvent]
ROOT_CHECK_S = 2.0
TICK_S = 0.2
MAX_EVENTS_PER_TRANSACTION = 500
LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE)

Event = tuple[type[FileSystemEvent], str, str]


def inotify_limit_message(root: str, exc: OSError) -> str:
    which = "max_user_watches" if exc.errno == errno.ENOSPC else "max_user_instances"
    return (
        f"watch root {root}: {exc.strerror or exc}; polling it instead (slower, and changes show "
        f"up only every poll_interval). Raise fs.inotify.{which} with systemd/60-tagd-inotify.conf "
        "(install it in /etc/sysctl.d/ and run `sysctl --system`), then restart tagd"
    )


def root_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the root folder, None when it is missing. A disk mounted on or
    unmounted from the root changes the device, a folder moved away and replaced the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


@dataclass
class RootWatch:
    root: WatchRoot
    path: str
    observer: BaseObserver | None = None
    identity: tuple[int, int] | None = None
    mode: str = "starting"

    def rel(self, path: str) -> str | None:
        if path == self.path or not path.startswith(self.path.rstrip("/") + "/"):
            return None
        return os.path.relpath(path, self.path).replace(os.sep, "/")


class _Forward(FileSystemEventHandler):
    """The observer thread's whole job: hand the event over."""

    def __init__(self, put: Callable[[tuple[int, Event]], None], index: int) -> None:
        self._put = put
        self._index = index

    def dispatch(self, event: FileSystemEvent) -> None:
        self._put((self._index, (type(event), str(event.src_path), str(event.dest_path))))


class Watcher:
    """Observers for every root plus the writer thread that applies their events."""

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        config: Config,
        *,
        on_queued: Callable[[], None] = lambda: None,
        on_root_back: Callable[[WatchRoot], None] = lambda root: None,
    ) -> None:
        self.db_path = db_path
        self.config = config
        self.settle_s = config.daemon.settle_seconds
        self.on_queued = on_queued
        self.on_root_back = on_root_back
        self.roots = [RootWatch(r, os.path.abspath(r.path)) for r in config.watch]
        self.beat = time.monotonic()
        self.last_error: str | None = None
        self._events: stdqueue.SimpleQueue[tuple[int, Event]] = stdqueue.SimpleQueue()
        self._pending: dict[str, tuple[int, tuple[int, int], float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(len(self.roots)):
            self._watch_root(i)
        self._thread = threading.Thread(target=self._run, name="tagd-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for rw in self.roots:
            self._unwatch(rw)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def health(self) -> dict[str, str]:
        return {rw.path: rw.mode for rw in self.roots}

    def _watch_root(self, index: int) -> None:
        rw = self.roots[index]
        rw.identity = root_identity(rw.path)
        if rw.identity is None:
            rw.mode = "unavailable"
            log.warning("watch root %s is missing (unmounted?); waiting for it", rw.path)
            return
        handler = _Forward(self._events.put, index)
        if not rw.root.polling:
            observer: BaseObserver | None = None
            try:
                observer = Observer()
                observer.schedule(handler, rw.path, recursive=True, event_filter=INOTIFY_EVENTS)
                observer.start()
                rw.observer, rw.mode = observer, "inotify"
                return
            except OSError as exc:
                if observer is not None:
                    _discard(observer)
                if exc.errno not in LIMIT_ERRNOS:
                    raise
                message = inotify_limit_message(rw.path, exc)
                log.warning("%s", message)
                self.last_error = message
        observer = PollingObserver(timeout=rw.root.poll_interval)
        observer.schedule(handler, rw.path, recursive=True, event_filter=POLLING_EVENTS)
        observer.start()
        rw.observer = observer
        rw.mode = "polling" if rw.root.polling else "polling (inotify limit reached)"

    def _unwatch(self, rw: RootWatch) -> None:
        if rw.observer is not None:
            _discard(rw.observer)
            rw.observer = None

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        self._conn = db.connect(self.db_path)
        next_check = time.monotonic() + ROOT_CHECK_S
        try:
            while not self._stop.is_set():
                self.beat = time.monotonic()
                batch = self._drain()
                if batch:
                    self._apply(batch)
                self._settle()
                if time.monotonic() >= next_check:
                    self._check_roots()
                    next_check = time.monotonic() + ROOT_CHECK_S
        finally:
            self._conn.close()

    def _drain(self) -> list[tuple[int, Event]]:
        try:
            batch = [self._events.get(timeout=TICK_S)]
        except stdqueue.Empty:
            return []
        while len(batch) < MAX_EVENTS_PER_TRANSACTION:
            try:
                batch.append(self._events.get_nowait())
            except stdqueue.Empty:
                break
        return batch

    def _apply(self, batch: list[tuple[int, Event]]) -> None:
        assert self._conn is not None
        queued = 0
        try:
            with db.write(self._conn):
                for index, (kind, src, dest) in batch:
                    queued += self._event(self.roots[index], kind, src, dest)
        except sqlite3.Error as exc:
            # The reconcile scan catches up with whatever these events meant.
            self.last_error = f"watcher: database error, events left to the next scan: {exc}"
            log.error("%s", self.last_error)
            return
        if queued:
            self.on_queued()

    def _event(self, rw: RootWatch, kind: type[FileSystemEvent], src: str, dest: str) -> int:
        conn = self._conn
        assert conn is not None
        if rw.observer is None:
            return 0
        if kind is FileClosedEvent:
            self._pending.pop(src, None)
            return self._enqueue_now(rw, src)
        if kind in (FileCreatedEvent, FileModifiedEvent):
            self._candidate(rw, src)
            return 0
        if kind is FileMovedEvent:
            self._pending.pop(src, None)
            rel = rw.rel(dest)
            if rel is None or not self._wanted(rw, rel):
                self._gone(rw, src)
                return 0
            self._rename(src, dest)
            return self._enqueue_now(rw, dest)
        if kind is FileDeletedEvent:
            self._pending.pop(src, None)
            self._gone(rw, src)
            return 0
        if kind is DirCreatedEvent:
            for path in self._files_under(rw, src):
                self._candidate(rw, path)
            return 0
        if kind is DirMovedEvent:
            rel = rw.rel(dest)
            if rel is None or excluded(rel, rw.root.exclude):
                self._gone(rw, src, folder=True)
                return 0
            self._rename(src, dest, folder=True)
            for path in self._files_under(rw, dest):
                self._candidate(rw, path)
            return 0
        if kind is DirDeletedEvent and src != rw.path:
            self._gone(rw, src, folder=True)
        return 0

    def _wanted(self, rw: RootWatch, rel: str) -> bool:
        return wanted(
            rel,
            extensions=self.config.extensions,
            include=rw.root.include,
            exclude=rw.root.exclude,
        )

    def _files_under(self, rw: RootWatch, folder: str) -> Iterator[str]:
        rel = rw.rel(folder)
        if rel is None or excluded(rel, rw.root.exclude):
            return
        for dirpath, dirnames, filenames in os.walk(folder):
            base = rw.rel(dirpath) or ""
            dirnames[:] = [d for d in dirnames if not excluded(f"{base}/{d}", rw.root.exclude)]
            for name in filenames:
                if self._wanted(rw, f"{base}/{name}"):
                    yield os.path.join(dirpath, name)

    def _candidate(self, rw: RootWatch, path: str) -> None:
        """A file that may still be being written: queue it once it has stopped changing."""
        rel = rw.rel(path)
        if rel is None or not self._wanted(rw, rel) or path in self._pending:
            return
        sig = _signature(path)
        if sig is not None:
            self._pending[path] = (self.roots.index(rw), sig, time.monotonic())

    def _settle(self) -> None:
        now = time.monotonic()
        due = [p for p, (_, _, since) in self._pending.items() if now - since >= self.settle_s]
        if not due:
            return
        ready: list[tuple[str, tuple[int, int]]] = []
        for path in due:
            index, sig, _ = self._pending[path]
            current = _signature(path)
            if current is None:
                del self._pending[path]
            elif current != sig:
                self._pending[path] = (index, current, now)
            else:
                del self._pending[path]
                ready.append((path, current))
        if not ready:
            return
        assert self._conn is not None
        try:
            with db.write(self._conn):
                queued = sum(self._enqueue(path, sig) for path, sig in ready)
        except sqlite3.Error as exc:
            self.last_error = f"watcher: database error, files left to the next scan: {exc}"
            log.error("%s", self.last_error)
            return
        if queued:
            self.on_queued()

    def _enqueue_now(self, rw: RootWatch, path: str) -> int:
        rel = rw.rel(path)
        if rel is None or not self._wanted(rw, rel):
            return 0
        sig = _signature(path)
        return 0 if sig is None else self._enqueue(path, sig)

    def _enqueue(self, path: str, sig: tuple[int, int]) -> int:
        conn = self._conn
        assert conn is not None
        conn.execute(
            "UPDATE paths SET missing = 0, last_seen = ? WHERE path = ?", (time.time(), path)
        )
        return int(queue.enqueue(conn, path, sig[0], sig[1]))

    def _rename(self, src: str, dest: str, *, folder: bool = False) -> None:
        """Same content under a new name: move its rows instead of tagging it again."""
        conn = self._conn
        assert conn is not None
        now = time.time()
        if folder:
            low, high = under(src)
            new = dest.rstrip("/") + "/"
            cut = len(low) + 1
            conn.execute(
                """UPDATE OR REPLACE paths SET path = ? || substr(path, ?), missing = 0,
                       last_seen = ? WHERE path >= ? AND path < ?""",
                (new, cut, now, low, high),
            )
            conn.execute(
                """UPDATE OR IGNORE jobs SET path = ? || substr(path, ?), updated_at = ?
                   WHERE path >= ? AND path < ? AND state != 'running'""",
                (new, cut, now, low, high),
            )
            return
        if conn.execute(
            "SELECT 1 FROM jobs WHERE path = ? AND state != 'running'", (src,)
        ).fetchall():
            conn.execute("DELETE FROM jobs WHERE path = ? AND state != 'running'", (dest,))
            conn.execute(
                "UPDATE OR IGNORE jobs SET path = ?, updated_at = ? WHERE path = ?",
                (dest, now, src),
            )
        conn.execute(
            """UPDATE OR REPLACE paths SET path = ?, missing = 0, last_seen = ?
               WHERE path = ?""",
            (dest, now, src),
        )

    def _gone(self, rw: RootWatch, path: str, *, folder: bool = False) -> None:
        """Deleted (or moved out of the roots): marked missing, never dropped from the index.
        Skipped when the root itself is gone or replaced; the root check handles that."""
        if root_identity(rw.path) != rw.identity:
            return
        conn = self._conn
        assert conn is not None
        if folder:
            low, high = under(path)
            for p in [p for p in self._pending if low <= p < high]:
                del self._pending[p]
            conn.execute(
                "UPDATE paths SET missing = 1 WHERE path >= ? AND path < ? AND missing = 0",
                (low, high),
            )
            conn.execute(
                "DELETE FROM jobs WHERE path >= ? AND path < ? AND state != 'running'",
                (low, high),
            )
            return
        conn.execute("UPDATE paths SET missing = 1 WHERE path = ?", (path,))
        conn.execute("DELETE FROM jobs WHERE path = ? AND state != 'running'", (path,))

    def _check_roots(self) -> None:
        """Unwatch roots that vanished or were replaced; rewatch and reconcile returning ones.
        Restart an observer whose thread died."""
        for i, rw in enumerate(self.roots):
            identity = root_identity(rw.path)
            if rw.observer is not None and identity == rw.identity and rw.observer.is_alive():
                continue
            if rw.observer is not None:
                if identity != rw.identity:
                    log.warning(
                        "watch root %s disappeared or was replaced (unmounted?); its files stay "
                        "in the index until it comes back",
                        rw.path,
                    )
                else:
                    log.warning("the observer for %s stopped; restarting it", rw.path)
                self._unwatch(rw)
                rw.mode = "unavailable"
                for p in [p for p, v in self._pending.items() if v[0] == i]:
                    del self._pending[p]
            if identity is None:
                rw.identity, rw.mode = None, "unavailable"
                continue
            try:
                self._watch_root(i)
            except OSError as exc:
                self.last_error = f"watch root {rw.path}: {exc}"
                log.error("%s", self.last_error)
                continue
            if rw.observer is not None:
                log.info("watch root %s is back (%s); reconciling it", rw.path, rw.mode)
                self.on_root_back(rw.root)


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return st.st_size, st.st_mtime_ns


def _discard(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except RuntimeError:
        pass
