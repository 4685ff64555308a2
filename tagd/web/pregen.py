"""Thumbnails made ahead by the daemon (`web.pregenerate_thumbs: true`).

`tagd run` starts one child process (`python -m tagd.web.pregen`) at nice 19: a process
rather than a thread, so it never holds the daemon's GIL while the tagging thread waits.
It makes a thumbnail only while the daemon has no file to tag (none running, none ready in
the queue), so tagging never shares the CPU with it. It first walks every tagged
file once (the catch-up: thumbnails missing after a restart, a new `thumbnail_size`, a
cleared cache), then follows the change log (`score_changes`) for files tagged since. It
writes the same files the web server would make on first request (tagd/web/thumbs.py), so a
request and the child never disagree; a file that does not render is counted and skipped
(the page shows the placeholder, as before).

The daemon hands the job over on the child's stdin and keeps the pipe open: closing it, or
the daemon dying by any signal, ends the child at its next thumbnail.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tagd.config import Config, WebConfig
from tagd.web.thumbs import Thumbnailer, cache_dir, readable_under

log = logging.getLogger("tagd.thumbs")

BATCH = 500
POLL_S = 2.0
STOP_WAIT_S = 10.0


@dataclass(frozen=True)
class Job:
    """What the child needs: plain values, sent as one JSON line."""

    database: str
    directory: str
    size: int
    max_pixels: int
    roots: tuple[str, ...]
    log_level: int = logging.INFO
    poll_s: float = POLL_S


@dataclass
class Tally:
    made: int = 0
    present: int = 0
    failed: int = 0
    waits: int = 0  # pauses while the daemon had files to tag
    unwritable: int = 0  # of the failed: the thumbnail could not be written


class Pregenerator:
    """The daemon's side: starts the child and stops it."""

    def __init__(self, config: Config, web: WebConfig) -> None:
        self.job = Job(
            database=str(config.database),
            directory=str(cache_dir(config.database, web.thumbnail_dir)),
            size=web.thumbnail_size,
            max_pixels=config.max_image_pixels,
            roots=tuple(os.path.realpath(r.path) for r in config.watch),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the child; one warning line (and first-request thumbnails only) if it
        cannot start: tagging goes on either way."""
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tagd.web.pregen"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
            )
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(asdict(self.job)).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            log.warning("thumbnails: cannot start the background maker: %s", exc)
            self.stop()
            return
        log.info("thumbnails: made ahead in the background (pid %d)", self.proc.pid)

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):  # the child is gone already
                proc.stdin.close()
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.proc = None


def run(job: Job, stop: threading.Event, tally: Tally | None = None) -> Tally:
    """Catch up over every tagged file, then follow the change log until `stop`; counts go
    to `tally` as they happen."""
    from tagd.index import changes, inventory, jobs
    from tagd.index.db import connect

    thumbs = Thumbnailer(Path(job.directory), job.size, workers=1, max_pixels=job.max_pixels)
    tally = tally if tally is not None else Tally()
    conn = connect(job.database, readonly=True)

    def tagging() -> bool:
        try:
            return jobs.tagging_now(conn)
        except sqlite3.Error:
            return False  # the next database read says what is wrong

    try:
        # Read before the catch-up: a file tagged during it is then seen in the log too.
        seq = changes.current_seq(conn)
        began, after = time.monotonic(), 0
        while not stop.is_set():
            last, files = inventory.tagged_files(conn, after=after, limit=BATCH)
            if last == after:
                break
            after = last
            _make_all(thumbs, files, job, tally, stop, tagging)
        if not stop.is_set():
            log.info(
                "thumbnails: catch-up done in %.1f s: %d made, %d already there, %d failed",
                time.monotonic() - began,
                tally.made,
                tally.present,
                tally.failed,
            )
        while not stop.is_set():
            try:
                logged = changes.changes_after(conn, seq, BATCH)
                if not logged:
                    stop.wait(job.poll_s)
                    continue
                seq = logged[-1][0]
                _, files = inventory.tagged_files(conn, ids=[f for _, f in logged])
            except sqlite3.Error as exc:
                log.warning("thumbnails: database: %s; next try in %.0f s", exc, job.poll_s * 5)
                stop.wait(job.poll_s * 5)
                continue
            _make_all(thumbs, files, job, tally, stop, tagging)
    finally:
        conn.close()
        thumbs.close()
    return tally


def _make_all(
    thumbs: Thumbnailer,
    files: list[tuple[int, str, list[str]]],
    job: Job,
    tally: Tally,
    stop: threading.Event,
    tagging: Callable[[], bool],
) -> None:
    checked = 0.0
    for _, sha, paths in files:
        if stop.is_set():
            return
        if thumbs.path(sha).exists():
            tally.present += 1
            continue
        while time.monotonic() - checked > job.poll_s / 4 and tagging() and not stop.is_set():
            tally.waits += 1
            stop.wait(job.poll_s)  # the daemon has files to tag: they come first
        checked = time.monotonic()
        usable = [p for p in paths if readable_under(p, job.roots)]
        try:
            made = thumbs.make(sha, usable) if usable else None
        except OSError as exc:  # the cache cannot be written: say so once, keep going
            if not tally.unwritable:
                log.warning("thumbnails: cannot write to %s: %s", thumbs.directory, exc)
            tally.unwritable += 1
            made = None
        if made is None:
            tally.failed += 1
            log.debug("thumbnails: no thumbnail for %s", paths[0] if paths else sha)
        else:
            tally.made += 1


def main() -> int:
    """The child: read the job, lower its priority, run until stdin closes or SIGTERM."""
    line = sys.stdin.buffer.readline()
    if not line:
        return 0
    raw = json.loads(line)
    job = Job(**{**raw, "roots": tuple(raw["roots"])})
    stop = threading.Event()

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the daemon closed the pipe or died
        stop.set()

    threading.Thread(target=watch_parent, name="tagd-thumbs-parent", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the daemon, which stops us
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    os.nice(19)
    systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if systemd
        else "%(asctime)s %(levelname)s %(message)s"
    )
    logging.basicConfig(level=job.log_level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        run(job, stop)
    except sqlite3.Error as exc:
        log.error("thumbnails: stopped: database %s: %s", job.database, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
