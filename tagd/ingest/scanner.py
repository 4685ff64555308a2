"""Find image files under the watched roots and queue the new or changed ones.

The walk streams: files are queued in small transactions as they are found, so memory stays
flat on a gallery of millions and the daemon can read the queue while a scan runs.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tagd.config import Config, WatchRoot
from tagd.index import db, jobs, paths
from tagd.ingest.filters import excluded, wanted

log = logging.getLogger(__name__)

CHUNK = 500


SKIPPED_KEY = "scan.skipped"


@dataclass
class Skipped:
    """What a walk passed over without a word before #13: files by extension, unlistable
    folders. Kept so `tagd stats` can say how much of a gallery tagd does not read."""

    by_extension: dict[str, int] = field(default_factory=dict)
    unlistable: int = 0
    examples: list[str] = field(default_factory=list)

    def add_file(self, name: str) -> None:
        ext = os.path.splitext(name)[1].lower() or "(none)"
        self.by_extension[ext] = self.by_extension.get(ext, 0) + 1

    def as_json(self, at: float) -> str:
        return json.dumps(
            {
                "at": at,
                "files": sum(self.by_extension.values()),
                "by_extension": dict(sorted(self.by_extension.items(), key=lambda kv: -kv[1])),
                "unlistable": self.unlistable,
                "unlistable_examples": self.examples,
            }
        )


@dataclass
class ScanResult:
    seen: int = 0
    queued: int = 0
    missing: int = 0
    skipped_roots: tuple[str, ...] = ()
    skipped: Skipped = field(default_factory=Skipped)


@dataclass(frozen=True)
class Found:
    path: str
    size: int
    mtime_ns: int


def walk(
    root: WatchRoot,
    extensions: tuple[str, ...],
    start: str | None = None,
    skipped: Skipped | None = None,
) -> Iterator[Found]:
    """Regular files under `root` (or only under its folder `start`) that tagd wants;
    symlinked folders are not followed.

    `skipped` counts regular files left out only for their extension (not those a user
    excluded) and folders that cannot be listed."""
    base = os.fspath(root.path)
    stack = [start or base]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc.strerror or exc)
            if skipped is not None:
                skipped.unlistable += 1
                if len(skipped.examples) < 20:
                    skipped.examples.append(f"{folder}: {exc.strerror or exc}")
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            rel = os.path.relpath(entry.path, base).replace(os.sep, "/")
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not excluded(rel, root.exclude):
                        stack.append(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=True):
                    continue
                if not wanted(
                    rel, extensions=extensions, include=root.include, exclude=root.exclude
                ):
                    if skipped is not None and wanted(
                        rel, extensions=("",), include=root.include, exclude=root.exclude
                    ):
                        skipped.add_file(entry.name)
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            yield Found(os.path.abspath(entry.path), st.st_size, st.st_mtime_ns)


def root_available(root: WatchRoot) -> bool:
    """A missing or empty mount point means an unplugged disk, not a deleted gallery."""
    try:
        return root.path.is_dir() and any(os.scandir(root.path))
    except OSError:
        return False


def scan(
    conn: sqlite3.Connection,
    config: Config,
    *,
    priority: int = 0,
    stop: Callable[[], bool] = lambda: False,
) -> ScanResult:
    """Queue new or changed files under every root; `stop()` ends the walk early, and a root
    whose walk was cut short keeps its paths (nothing is marked missing on a partial walk)."""
    result = ScanResult()
    skipped: list[str] = []
    for root in config.watch:
        if stop():
            break
        if not root_available(root):
            log.warning("watch root %s is missing or empty; skipping it (unmounted?)", root.path)
            skipped.append(str(root.path))
            continue
        started = time.time()
        batch: list[Found] = []
        for found in walk(root, config.extensions, skipped=result.skipped):
            result.seen += 1
            batch.append(found)
            if len(batch) >= CHUNK:
                result.queued += _enqueue(conn, batch, priority, started)
                batch.clear()
                if stop():
                    break
        result.queued += _enqueue(conn, batch, priority, started)
        if not stop() and root_available(root):
            result.missing += mark_missing(conn, os.path.abspath(root.path), started)
    result.skipped_roots = tuple(skipped)
    if not stop():
        with db.write(conn):
            db.set_state(conn, SKIPPED_KEY, result.skipped.as_json(time.time()))
    return result


def last_skipped(conn: sqlite3.Connection) -> dict[str, object] | None:
    """What the last complete scan skipped (see Skipped), or None before the first one."""
    raw = db.get_state(conn, SKIPPED_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _enqueue(conn: sqlite3.Connection, batch: list[Found], priority: int, seen_at: float) -> int:
    if not batch:
        return 0
    with db.write(conn):
        paths.mark_seen_many(conn, (f.path for f in batch), seen_at)
        return sum(jobs.enqueue(conn, f.path, f.size, f.mtime_ns, priority=priority) for f in batch)


def under(root: str) -> tuple[str, str]:
    """Bounds of the paths below `root`, as an index-friendly range (no LIKE escaping)."""
    prefix = root.rstrip("/") + "/"
    return prefix, prefix[:-1] + chr(ord("/") + 1)


def mark_missing(conn: sqlite3.Connection, root: str, before: float) -> int:
    """Paths under `root` not seen by the walk that started at `before` are gone."""
    low, high = under(root)
    with db.write(conn):
        return paths.mark_missing_under(conn, low, high, seen_before=before)


def scan_folder(
    conn: sqlite3.Connection, config: Config, root: WatchRoot, folder: str, *, priority: int = 0
) -> ScanResult:
    """Reconcile one folder under `root` (a disk mounted on it or unmounted from it): queue
    what is there now, mark what is not seen any more missing."""
    result = ScanResult()
    rel = os.path.relpath(folder, os.fspath(root.path)).replace(os.sep, "/")
    if rel.startswith("..") or excluded(rel, root.exclude):
        return result
    started = time.time()
    batch: list[Found] = []
    for found in walk(root, config.extensions, start=folder):
        result.seen += 1
        batch.append(found)
        if len(batch) >= CHUNK:
            result.queued += _enqueue(conn, batch, priority, started)
            batch.clear()
    result.queued += _enqueue(conn, batch, priority, started)
    result.missing = mark_missing(conn, os.path.abspath(folder), started)
    return result


def queue_untagged(conn: sqlite3.Connection, model_ids: list[int]) -> int:
    """Queue known, present files that lack a result from any of `model_ids`."""
    return jobs.queue_untagged(conn, model_ids)
