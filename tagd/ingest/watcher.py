"""Watch the gallery roots and turn filesystem events into queue and path-table changes.

Observer threads only append `(event type, src, dest)` to an in-memory queue, so they never
block on the database and cannot die from a handler error. One writer thread applies the
events in short transactions, waits until new files stop changing (settle time), and checks
every root: a root that disappears or is replaced (an unmounted disk) is unwatched and left as
it is in the index, then watched and reconciled when it comes back. A disk mounted on a folder
below a root, or unmounted from one, is seen in /proc/self/mountinfo: the root's observer
restarts (inotify watches do not cross onto a new mount) and that folder is rescanned.
"""

from __future__ import annotations

import errno
import logging
import os
import queue as stdqueue
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

from tagd.config import Config, WatchRoot
from tagd.index import db, paths
from tagd.index import jobs as queue
from tagd.ingest.filters import excluded, wanted
from tagd.ingest.scanner import scan_folder, under
from tagd.names import for_humans

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
MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")

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


def read_mounts(mountinfo: str = MOUNTINFO) -> dict[str, str] | None:
    """Mount point → identity (mount id, device, source root) from a mountinfo file; None
    where there is none to read (not Linux), which turns mount tracking off."""
    try:
        with open(mountinfo, "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    mounts: dict[str, str] = {}
    for line in data.splitlines():
        fields = line.split(b" ")
        if len(fields) < 5:
            continue
        point = _OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), fields[4])
        mounts[os.fsdecode(point)] = b" ".join(fields[0:1] + fields[2:4]).decode("ascii", "replace")
    return mounts


def mounts_under(mounts: dict[str, str] | None, root: str) -> dict[str, str]:
    """The mounts strictly below `root` (the root's own mount is the identity check's)."""
    if not mounts:
        return {}
    prefix = root.rstrip("/") + "/"
    return {p: ident for p, ident in mounts.items() if p.startswith(prefix)}


def changed_mounts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Mount points that appeared, went or changed, outermost only (a rescan covers the
    folders below it)."""
    changed = sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p))
    top: list[str] = []
    for p in changed:
        if not any(p.startswith(t.rstrip("/") + "/") for t in top):
            top.append(p)
    return top


@dataclass
class RootWatch:
    root: WatchRoot
    path: str
    observer: BaseObserver | None = None
    identity: tuple[int, int] | None = None
    mode: str = "starting"
    mounts: dict[str, str] = field(default_factory=dict)

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
        self.mountinfo = MOUNTINFO
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
        rw.mounts = mounts_under(read_mounts(self.mountinfo), rw.path)
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
        self._conn = db.connect(Path(self.db_path))
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
        paths.mark_seen(conn, path, time.time())
        return int(queue.enqueue(conn, path, sig[0], sig[1]))

    def _rename(self, src: str, dest: str, *, folder: bool = False) -> None:
        """Same content under a new name: move its rows instead of tagging it again."""
        conn = self._conn
        assert conn is not None
        now = time.time()
        if folder:
            low, high = under(src)
            paths.move_under(conn, low, high, dest, now)
            queue.move_under(conn, low, high, dest, now)
            return
        queue.move(conn, src, dest, now)
        paths.move(conn, src, dest, now)

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
            paths.mark_missing_under(conn, low, high)
            queue.forget_under(conn, low, high)
            return
        paths.mark_missing(conn, path)
        queue.forget_path(conn, path)

    def _check_roots(self) -> None:
        """Unwatch roots that vanished or were replaced; rewatch and reconcile returning ones.
        Restart an observer whose thread died."""
        for i, rw in enumerate(self.roots):
            identity = root_identity(rw.path)
            if rw.observer is not None and identity == rw.identity and rw.observer.is_alive():
                self._check_mounts(i)
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

    def _check_mounts(self, index: int) -> None:
        """A disk mounted below a root hides the files under it and brings its own; one
        unmounted does the reverse. Rewatch the root and reconcile those folders now rather
        than at the next scheduled scan."""
        rw = self.roots[index]
        current = mounts_under(read_mounts(self.mountinfo), rw.path)
        changed = changed_mounts(rw.mounts, current)
        if not changed:
            return
        for point in changed:
            what = "mounted on" if point in current else "unmounted from"
            log.info(
                "a file system was %s %s (under watch root %s); rescanning it",
                what,
                for_humans(point),
                rw.path,
            )
        self._unwatch(rw)
        try:
            self._watch_root(index)
        except OSError as exc:
            self.last_error = f"watch root {rw.path}: {exc}"
            log.error("%s", self.last_error)
            return
        rw.mounts = current
        assert self._conn is not None
        queued = 0
        for point in changed:
            try:
                queued += scan_folder(self._conn, self.config, rw.root, point).queued
            except sqlite3.Error as exc:
                self.last_error = f"watcher: database error, {point} left to the next scan: {exc}"
                log.error("%s", for_humans(self.last_error))
        if queued:
            self.on_queued()


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
