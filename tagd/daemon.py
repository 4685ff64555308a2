"""`tagd run`: the service loop that keeps every image under the watch roots tagged.

Threads, each with its own SQLite connection: the worker (claim a batch → Pipeline.process),
the watcher's writer (events → queue), APScheduler's pool (reconcile scans, orphan reaping,
WAL checkpoints). The main thread supervises: it owns signals, sd_notify, the lease heartbeat
and the status row the CLI reads, and pings the systemd watchdog only while the worker and
the watcher are making progress.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from tagd import db, queue, scanner
from tagd.config import Config, ConfigError, WatchRoot
from tagd.config import load as load_config
from tagd.notify import Notifier
from tagd.pipeline import Pipeline, owner_id
from tagd.status import LAST_ERROR_KEY, STATE_KEY
from tagd.tagger import Tagger
from tagd.watcher import Watcher

log = logging.getLogger(__name__)

TICK_S = 0.25
STATUS_EVERY_S = 5.0
IDLE_POLL_S = 1.0
STOP_GRACE_S = 10.0
ERROR_PAUSE_S = 5.0
REAP_EVERY_S = 60.0
CHECKPOINT_EVERY_S = 300.0
WAL_TRUNCATE_BYTES = 64 << 20


def hold_daemon_lock(database: Path) -> int:
    """An exclusive lock beside the database for this process's lifetime (the kernel drops it
    when the process dies, even by SIGKILL); a second daemon on the same database is refused.

    Leases already keep two daemons from tagging the same file, but both would watch, scan and
    write caches twice over.
    """
    path = Path(f"{database}.daemon.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DaemonRunning(
            f"another tagd daemon (pid {holder}) is already running on {database}: stop it "
            "first (systemctl stop tagd), or give this one another `database:`"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class DaemonRunning(Exception):
    """`tagd run` while another daemon holds the database."""


class Worker:
    """Claims batches and runs them through the pipeline until told to stop."""

    def __init__(self, pipeline: Pipeline, config: Config) -> None:
        self.pipeline = pipeline
        self.config = config
        self.beat = time.monotonic()
        self.last_error: str | None = None
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tagd-worker", daemon=True)

    def _halt(self) -> bool:
        """Asked between pipeline steps: proves the worker alive, stops on stop or pause."""
        self.beat = time.monotonic()
        return self.stop.is_set() or queue.is_paused(self.pipeline.conn)

    def _run(self) -> None:
        conn = self.pipeline.conn
        while not self.stop.is_set():
            self.beat = time.monotonic()
            try:
                if queue.is_paused(conn):
                    self.wake.wait(IDLE_POLL_S)
                    self.wake.clear()
                    continue
                # run() keeps decoding the next batches while the model runs this one.
                outcome = self.pipeline.run(stop=self._halt)
                if not (outcome.done or outcome.failed or outcome.retrying):
                    self.wake.wait(IDLE_POLL_S)
                    self.wake.clear()
                    continue
                if outcome.done or outcome.failed:
                    log.info(
                        "tagged %d, failed %d, retrying %d",
                        outcome.done,
                        outcome.failed,
                        outcome.retrying,
                    )
                for path, reason in outcome.errors:
                    self.last_error = f"{path}: {reason}"
            except sqlite3.OperationalError as exc:
                self.last_error = f"database: {exc}"
                log.error("worker: %s; retrying in %.0f s", self.last_error, ERROR_PAUSE_S)
                self.stop.wait(ERROR_PAUSE_S)
            except Exception as exc:
                # A model that stopped working (GPU lost, driver reset) needs a restart.
                self.last_error = f"worker stopped: {type(exc).__name__}: {exc}"
                log.exception("worker stopped")
                return


class Daemon:
    def __init__(
        self,
        config: Config,
        taggers: Sequence[Tagger],
        *,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.taggers = list(taggers)
        self.notifier = notifier or Notifier()
        self.host = socket.gethostname()
        self.owner = owner_id()
        self.started = time.time()
        self._stop_requested = False
        self._reload_requested = False
        self._scan_stop = threading.Event()
        self.conn = db.connect(config.database)
        self.worker: Worker | None = None
        self.watcher: Watcher | None = None
        self.scheduler = None
        self.exit_code = 0

    # -- signals: only flags, the main loop acts on them ------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop_requested = True

    def request_reload(self, *_: object) -> None:
        self._reload_requested = True

    # -- parts ------------------------------------------------------------------------------

    def _start_parts(self) -> None:
        config = self.config
        self._scan_stop.clear()
        reaped = queue.reap_orphans(self.conn, self.owner, self.host)
        if reaped:
            log.info("%d jobs left running by a stopped tagd are queued again", reaped)
        worker_conn = db.connect(config.database)
        pipeline = Pipeline(worker_conn, config, self.taggers, owner=self.owner)
        self.worker = Worker(pipeline, config)
        self.watcher = Watcher(
            config.database,
            config,
            on_queued=self.worker.wake.set,
            on_root_back=self._reconcile_soon,
        )
        self.watcher.start()
        self.worker.thread.start()
        self.scheduler = self._scheduler(pipeline.model_ids)
        self.scheduler.start()

    def _stop_parts(self) -> None:
        self._scan_stop.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop.set()
            self.worker.wake.set()
            self.worker.thread.join(timeout=STOP_GRACE_S)
            released = queue.release(self.conn, self.owner)
            if self.worker.thread.is_alive():
                log.warning(
                    "the batch in flight did not finish in time; %d jobs released", released
                )
            else:
                self.worker.pipeline.close()
                self.worker.pipeline.conn.close()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self.worker = self.watcher = self.scheduler = None

    def _scheduler(self, model_ids: list[int]):  # type: ignore[no-untyped-def]
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        # A busy GIL or a suspended machine must delay maintenance, never skip it.
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(2)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        now = datetime.now(UTC)
        scheduler.add_job(
            self._reconcile,
            "interval",
            seconds=self.config.daemon.reconcile_interval,
            args=[self.config.watch, model_ids],
            id="reconcile",
            next_run_time=now,
        )
        scheduler.add_job(self._reap, "interval", seconds=REAP_EVERY_S, id="reap")
        scheduler.add_job(self._checkpoint, "interval", seconds=CHECKPOINT_EVERY_S, id="wal")
        scheduler.add_job(
            self._rank_cache,
            "interval",
            seconds=self.config.daemon.rank_cache_interval,
            id="rank-cache",
            next_run_time=now,
        )
        hydrus = getattr(self.config, "hydrus", None)
        if getattr(hydrus, "enabled", False):
            scheduler.add_job(
                self._hydrus_sync,
                "interval",
                seconds=hydrus.interval,
                id="hydrus",
                next_run_time=now,
            )
        return scheduler

    def _hydrus_sync(self) -> None:
        from tagd import hydrus

        conn = db.connect(self.config.database)
        try:
            report = hydrus.sync(conn, self.config)
            log.info("hydrus sync: %s", report)
        except Exception as exc:
            log.warning(
                "hydrus sync failed, next try in %.0f s: %s", self.config.hydrus.interval, exc
            )
        finally:
            conn.close()

    def _reconcile_soon(self, root: WatchRoot) -> None:
        if self.scheduler is not None:
            self.scheduler.add_job(self._reconcile, args=[(root,), []])

    def _reconcile(self, roots: tuple[WatchRoot, ...], model_ids: list[int]) -> None:
        """Catch up with whatever the watcher missed (downtime, overflow, network mounts)."""
        conn = db.connect(self.config.database)
        try:
            config = dataclasses.replace(self.config, watch=tuple(roots))
            result = scanner.scan(conn, config, stop=self._scan_stop.is_set)
            extra = scanner.queue_untagged(conn, model_ids)
            log.info(
                "reconcile: %d images seen, %d queued, %d missing%s",
                result.seen,
                result.queued + extra,
                result.missing,
                f", skipped {', '.join(result.skipped_roots)}" if result.skipped_roots else "",
            )
            if (result.queued or extra) and self.worker is not None:
                self.worker.wake.set()
        except sqlite3.Error as exc:
            log.error("reconcile: database error: %s", exc)
        finally:
            conn.close()

    def _reap(self) -> None:
        conn = db.connect(self.config.database)
        try:
            queue.reap_orphans(conn, self.owner, self.host)
        finally:
            conn.close()

    def _rank_cache(self) -> None:
        """Keep search's ranking cache current (patched in place; rebuilt daily)."""
        from tagd import rankcache

        conn = db.connect(self.config.database)
        try:
            outcome = rankcache.refresh(conn, self.config.database)
            (log.info if outcome == "built" else log.debug)("search ranking cache: %s", outcome)
            from tagd import bitmaps

            outcome = bitmaps.refresh(conn, self.config.database)
            (log.info if outcome == "built" else log.debug)("search bitmaps: %s", outcome)
            from tagd import ann

            for outcome in ann.refresh(conn, self.config.database):
                (log.info if "built" in outcome else log.debug)("similar index: %s", outcome)
        except sqlite3.Error as exc:
            log.warning("search ranking cache: database error: %s", exc)
        finally:
            conn.close()

    def _checkpoint(self) -> None:
        wal = f"{self.config.database}-wal"
        try:
            big = os.path.getsize(wal) > WAL_TRUNCATE_BYTES
        except OSError:
            return
        conn = db.connect(self.config.database)
        try:
            conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if big else 'PASSIVE'})").fetchall()
        finally:
            conn.close()

    # -- supervision ------------------------------------------------------------------------

    def healthy(self) -> bool:
        """The worker loops (a batch is not stuck past its lease) and the watcher drains."""
        now = time.monotonic()
        worker, watcher = self.worker, self.watcher
        if worker is None or watcher is None or self.scheduler is None:
            return False
        if not worker.thread.is_alive() or not watcher.alive():
            return False
        if now - worker.beat > self.config.daemon.lease_seconds:
            return False
        return now - watcher.beat <= 30.0 and bool(self.scheduler.running)

    def provider(self) -> str:
        return ",".join(sorted({t.provider for t in self.taggers})) or "none"

    def status_line(self, counts: dict[str, int], paused: bool) -> str:
        watchers = self.watcher.health() if self.watcher else {}
        bad = sum(1 for mode in watchers.values() if mode not in ("inotify", "polling"))
        text = (
            f"queue={counts['queued']} running={counts['running']} failed={counts['failed']} "
            f"done={counts['done']} provider={self.provider()} "
            f"watchers={'ok' if not bad else f'{bad} degraded'}"
        )
        return text + (" paused" if paused else "")

    def publish(self) -> str:
        """Write the status row `tagd status` reads; returns the one-line STATUS=."""
        counts = queue.counts(self.conn)
        paused = queue.is_paused(self.conn)
        errors = [
            e
            for e in (
                self.worker.last_error if self.worker else None,
                self.watcher.last_error if self.watcher else None,
            )
            if e
        ]
        info = {
            "pid": os.getpid(),
            "host": self.host,
            "owner": self.owner,
            "started": self.started,
            "heartbeat": time.time(),
            "provider": self.provider(),
            "models": [t.name for t in self.taggers],
            "watchers": self.watcher.health() if self.watcher else {},
            "healthy": self.healthy(),
        }
        with db.write(self.conn):
            db.set_state(self.conn, STATE_KEY, json.dumps(info, sort_keys=True))
            if errors:
                db.set_state(self.conn, LAST_ERROR_KEY, errors[-1])
        return self.status_line(counts, paused)

    def _reload(self) -> None:
        source = self.config.source
        try:
            new = load_config(str(source) if source else None)
        except ConfigError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
            return
        self.notifier.reloading()
        log.info("reloading %s", source)
        self._stop_parts()
        if new.models != self.config.models or new.inference != self.config.inference:
            from tagd import tagger

            try:
                self.taggers = tagger.load_all(new)
            except Exception as exc:
                log.error("reload: %s; keeping the loaded models", exc)
                new = dataclasses.replace(new, models=self.config.models)
        self.config = new
        self._start_parts()
        self.notifier.ready(self.publish())

    def run(self) -> int:
        """Start everything, tell systemd we are ready, supervise until SIGTERM."""
        self._start_parts()
        self.notifier.ready(self.publish())
        log.info(
            "tagd running: %d roots, models %s on %s",
            len(self.config.watch),
            ", ".join(t.name for t in self.taggers),
            self.provider(),
        )
        ping_every = self.notifier.ping_interval()
        last_ping = last_status = last_heartbeat = 0.0
        try:
            while not self._stop_requested:
                time.sleep(TICK_S)
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload()
                now = time.monotonic()
                assert self.worker is not None
                if not self.worker.thread.is_alive() and not self._stop_requested:
                    log.error("the worker stopped: %s; exiting", self.worker.last_error)
                    self.exit_code = 1
                    break
                lease = self.config.daemon.lease_seconds
                if now - last_heartbeat >= lease / 3 and now - self.worker.beat < lease:
                    queue.heartbeat(self.conn, self.owner, lease)
                    last_heartbeat = now
                if now - last_status >= STATUS_EVERY_S:
                    self.notifier.status(self.publish())
                    last_status = now
                if ping_every is not None and now - last_ping >= ping_every and self.healthy():
                    self.notifier.watchdog()
                    last_ping = now
        finally:
            self.notifier.stopping()
            log.info("stopping: finishing the batch in flight")
            worker = self.worker
            self._stop_parts()
            if worker is not None and worker.last_error:
                # keep the last error for `tagd status` even if it came after the last tick
                with db.write(self.conn):
                    db.set_state(self.conn, LAST_ERROR_KEY, worker.last_error)
            with db.write(self.conn):
                info = json.loads(db.get_state(self.conn, STATE_KEY) or "{}")
                info.update(heartbeat=time.time(), stopped=True, healthy=False)
                db.set_state(self.conn, STATE_KEY, json.dumps(info, sort_keys=True))
            self.conn.close()
        return self.exit_code
