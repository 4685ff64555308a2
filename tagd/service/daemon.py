"""`tagd run`: the service loop that keeps every image under the watch roots tagged.

Threads, each with its own SQLite connection: the worker (claim a batch → Pipeline.process),
the watcher's writer (events → queue), APScheduler's pool (reconcile scans, orphan reaping,
WAL checkpoints). The main thread supervises: it owns signals, sd_notify, the lease heartbeat
and the status row the CLI reads, and pings the systemd watchdog only while the worker and
the watcher are making progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tagd import cluster
from tagd.config import Config, ConfigError, WatchRoot
from tagd.config import load as load_config
from tagd.index import db, jobs
from tagd.index.dberrors import DatabaseTrouble
from tagd.index.status import LAST_ERROR_KEY, STATE_KEY, HealthFile
from tagd.ingest import scanner
from tagd.ingest.watcher import Watcher
from tagd.progress import Progress, RateMeter
from tagd.service.notify import Notifier
from tagd.service.queries import QueryServer
from tagd.tagging.pipeline import Pipeline, owner_id
from tagd.tagging.tagger import Tagger

log = logging.getLogger(__name__)

TICK_S = 0.25
STATUS_EVERY_S = 5.0
IDLE_POLL_S = 1.0
STOP_GRACE_S = 10.0
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


T = TypeVar("T")


def idle_priority(fn: Callable[[], T]) -> T:
    """fn() in a thread of its own at nice 19. A first HNSW build over an existing library
    takes half an hour of every core at a million files; at nice 19 it takes only what
    tagging and searches leave. Linux keeps a nice value per thread and the threads a thread
    starts (usearch's workers) inherit it, and an unprivileged thread cannot undo it, so the
    scheduler's pooled thread is not the one lowered."""
    with ThreadPoolExecutor(1, "tagd-idle-job", initializer=_lowest_priority) as pool:
        return pool.submit(fn).result()


def _lowest_priority() -> None:
    with contextlib.suppress(OSError):  # not permitted: the daemon's own priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class DaemonRunning(Exception):
    """`tagd run` while another daemon holds the database."""


class Worker:
    """Claims batches and runs them through the pipeline until told to stop."""

    def __init__(
        self, pipeline: Pipeline, config: Config, trouble: DatabaseTrouble | None = None
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.trouble = trouble or DatabaseTrouble()
        self._holding = False
        self.beat = time.monotonic()
        self.last_error: str | None = None
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tagd-worker", daemon=True)

    def _halt(self) -> bool:
        """Asked between pipeline steps: proves the worker alive, stops on stop or pause."""
        self.beat = time.monotonic()
        return self.stop.is_set() or jobs.is_paused(self.pipeline.conn)

    def _run(self) -> None:
        conn = self.pipeline.conn
        while not self.stop.is_set():
            self.beat = time.monotonic()
            wait = self.trouble.waiting()
            if wait:
                # The database takes no writes: claim nothing until the next try.
                self.stop.wait(min(wait, IDLE_POLL_S))
                continue
            try:
                if self._holding:
                    # Jobs a failed batch could not hand back; the attempt does not count.
                    jobs.release(conn, self.pipeline.owner)
                    self._holding = False
                if jobs.is_paused(conn):
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
            except (sqlite3.Error, db.DatabaseError) as exc:
                self._holding = True
                delay = self.trouble.failed(exc, self.config.database)
                self.last_error = self.trouble.error
                log.error("worker: %s; not claiming work, next try in %.0f s", exc, delay)
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
        self.trouble = DatabaseTrouble()
        self.health = HealthFile(config.database)
        self._last_status = self._last_heartbeat = 0.0
        self._model_ids: list[int] = []
        self.worker: Worker | None = None
        self.watcher: Watcher | None = None
        self.scheduler: Any = None
        self.thumbs: Any = None  # tagd.web.pregen.Pregenerator with web.pregenerate_thumbs
        self.queries: QueryServer | None = None
        self.exit_code = 0
        self.meter = RateMeter()
        self.rate = 0.0
        self.counts: dict[str, int] = {}

    # -- signals: only flags, the main loop acts on them ------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop_requested = True

    def request_reload(self, *_: object) -> None:
        self._reload_requested = True

    # -- parts ------------------------------------------------------------------------------

    def _start_parts(self) -> None:
        config = self.config
        self._scan_stop.clear()
        reaped = jobs.reap_orphans(
            self.conn, self.owner, self.host, max_attempts=config.daemon.max_attempts
        )
        if reaped:
            log.info("%d jobs left running by a stopped tagd are queued again", reaped)
        worker_conn = db.connect(config.database)
        try:
            pipeline = cluster.pipeline_for(worker_conn, config, self.taggers, owner=self.owner)
        except BaseException:
            worker_conn.close()
            raise
        self.worker = Worker(pipeline, config, self.trouble)
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
        self.queries = QueryServer(config.database)
        self.queries.start()
        web = config.web
        if web is not None and web.pregenerate_thumbs:
            from tagd.web.pregen import Pregenerator

            self.thumbs = Pregenerator(config, web)
            self.thumbs.start()

    def _stop_parts(self) -> None:
        self._scan_stop.set()
        if self.queries is not None:
            self.queries.stop()
            self.queries = None
        if self.thumbs is not None:
            self.thumbs.stop()
            self.thumbs = None
        if self.watcher is not None:
            self.watcher.stop()
        if self.worker is not None:
            self.worker.stop.set()
            self.worker.wake.set()
            self.worker.thread.join(timeout=STOP_GRACE_S)
            try:
                released = jobs.release(self.conn, self.owner)
            except sqlite3.Error as exc:
                released = 0
                self.trouble.failed(exc, self.config.database)
                log.error(
                    "%s; this daemon's jobs stay `running` until a tagd start queues them again",
                    self.trouble.error,
                )
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

    def _scheduler(self, model_ids: list[int]) -> Any:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        # A busy GIL or a suspended machine must delay maintenance, never skip it.
        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(3)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        now = datetime.now(UTC)
        self._model_ids = model_ids
        scheduler.add_job(
            self._guarded(self._reconcile),
            "interval",
            seconds=self.config.daemon.reconcile_interval,
            args=[self.config.watch, model_ids],
            id="reconcile",
            next_run_time=now,
        )
        scheduler.add_job(self._guarded(self._reap), "interval", seconds=REAP_EVERY_S, id="reap")
        scheduler.add_job(
            self._guarded(self._checkpoint), "interval", seconds=CHECKPOINT_EVERY_S, id="wal"
        )
        scheduler.add_job(
            self._guarded(self._rank_cache),
            "interval",
            seconds=self.config.daemon.rank_cache_interval,
            id="rank-cache",
            next_run_time=now,
        )
        scheduler.add_job(
            self._guarded(self._similar_index),
            "interval",
            seconds=self.config.daemon.rank_cache_interval,
            id="similar-index",
            next_run_time=now,
        )
        hydrus = self.config.hydrus
        if hydrus.enabled:
            scheduler.add_job(
                self._hydrus_sync,
                "interval",
                seconds=hydrus.interval,
                id="hydrus",
                next_run_time=now,
            )
        return scheduler

    def _guarded(self, job: Callable[..., object]) -> Callable[..., None]:
        """A scheduled job that meets a database error logs one line and runs again at its
        next time; APScheduler would log a traceback."""

        def run(*args: object) -> None:
            try:
                job(*args)
            except (sqlite3.Error, db.DatabaseError) as exc:
                delay = self.trouble.failed(exc, self.config.database)
                log.error("%s: %s; next try in %.0f s or later", job.__name__, exc, delay)
            except OSError as exc:
                log.error("%s: %s; next try at its next run", job.__name__, exc)

        run.__name__ = job.__name__
        return run

    def _hydrus_sync(self) -> None:
        from tagd.hydrus import sync as hydrus

        conn = db.connect(self.config.database)
        try:
            report = hydrus.sync(conn, self.config)
            log.info("hydrus sync: %s", report)
        except Exception as exc:
            log.warning(
                "hydrus sync failed, next try in %.0f s: %s",
                self.config.hydrus.interval,
                hydrus.redact(str(exc)),
            )
        finally:
            conn.close()

    def _reconcile_soon(self, root: WatchRoot) -> None:
        if self.scheduler is not None:
            self.scheduler.add_job(self._guarded(self._reconcile), args=[(root,), []])

    def _recovered(self) -> None:
        """Writes work again: queue what the watcher could not while they failed."""
        log.info("the database takes writes again; tagging resumes")
        if self.scheduler is not None:
            self.scheduler.add_job(
                self._guarded(self._reconcile),
                args=[self.config.watch, self._model_ids],
            )
        if self.worker is not None:
            self.worker.wake.set()

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
            jobs.reap_orphans(
                conn, self.owner, self.host, max_attempts=self.config.daemon.max_attempts
            )
        finally:
            conn.close()

    def _rank_cache(self) -> None:
        """Keep search's ranking cache current (patched in place; rebuilt daily)."""
        from tagd.search import rankcache

        conn = db.connect(self.config.database)
        try:
            outcome = rankcache.refresh(conn, self.config.database)
            (log.info if outcome == "built" else log.debug)("search ranking cache: %s", outcome)
            from tagd.search import bitmaps

            outcome = bitmaps.refresh(conn, self.config.database)
            (log.info if outcome == "built" else log.debug)("search bitmaps: %s", outcome)
        except sqlite3.Error as exc:
            log.warning("search ranking cache: database error: %s", exc)
        finally:
            conn.close()

    def _similar_index(self) -> None:
        """Keep the HNSW index for `similar` current: its own job, so a build (minutes at a
        million files) never holds up the ranking cache and bitmaps."""
        from tagd.search import ann, similar

        if not ann.enabled():
            return

        def refresh() -> list[str]:
            conn = db.connect(self.config.database)
            try:
                return similar.refresh_ann(conn, self.config.database, at_once=False, apart=True)
            finally:
                conn.close()

        try:
            for outcome in idle_priority(refresh):
                (log.info if "built" in outcome else log.debug)("similar index: %s", outcome)
        except sqlite3.Error as exc:
            log.warning("similar index: database error: %s", exc)

    def _checkpoint(self) -> None:
        wal = f"{self.config.database}-wal"
        try:
            big = os.path.getsize(wal) > WAL_TRUNCATE_BYTES
        except OSError:
            return
        conn = db.connect(self.config.database)
        try:
            db.checkpoint(conn, truncate=big)
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

    def _live_line(self) -> Progress | None:
        """A live status line on a terminal (not under systemd, whose journal wants lines)."""
        if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
            return None
        import sys

        if not sys.stderr.isatty():
            return None
        return Progress("tagd run", unit="images").__enter__()

    def _busy(self) -> bool:
        c = self.counts
        return bool(c and (c["queued"] or c["running"]))

    def _progress_text(self) -> str:
        from tagd.progress import eta

        c = self.counts
        failed = c["failed"]
        return (
            f"{c['queued']} queued, {c['running']} running, {c['done']} done, "
            f"{failed} failed job{'' if failed == 1 else 's'}; {self.rate:.1f} images/s, "
            f"eta {eta(c['queued'] + c['running'], self.rate)}"
        )

    def _show_live(self, live: Progress) -> None:
        c = self.counts
        live.update(
            c["done"] + c["failed"],
            c["done"] + c["failed"] + c["queued"] + c["running"],
            note=self._progress_text(),
        )

    def publish(self) -> str:
        """Write the status row `tagd status` reads; returns the one-line STATUS=."""
        counts = jobs.counts(self.conn)
        paused = jobs.is_paused(self.conn)
        self.rate = self.meter.add(counts["done"] + counts["failed"])
        self.counts = counts
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
            "rate": round(self.rate, 3),
        }
        with db.write(self.conn):
            db.set_state(self.conn, STATE_KEY, json.dumps(info, sort_keys=True))
            if errors:
                db.set_state(self.conn, LAST_ERROR_KEY, errors[-1])
        return self.status_line(counts, paused)

    def supervise_database(self, now: float) -> str | None:
        """Heartbeat the leases and publish status; a database error is ridden out, never
        fatal. Returns the STATUS= line to send, or None when it is not time yet."""
        if self.trouble.waiting():
            return None
        try:
            lease = self.config.daemon.lease_seconds
            worker = self.worker
            alive = worker is not None and now - worker.beat < lease
            if now - self._last_heartbeat >= lease / 3 and alive:
                jobs.heartbeat(self.conn, self.owner, lease)
                self._last_heartbeat = now
            every = min(STATUS_EVERY_S, self.config.daemon.progress_log_interval)
            if now - self._last_status < every and not self.trouble.active:
                return None
            line = self.publish()
        except (sqlite3.Error, db.DatabaseError) as exc:
            delay = self.trouble.failed(exc, self.config.database)
            log.error("%s; not tagging, next try in %.0f s", self.trouble.error, delay)
            self._last_status = now
            self.health.write(os.getpid(), self.trouble)
            return f"{self.trouble.error}; not tagging, next try in {delay:.0f} s"
        self._last_status = now
        if self.trouble.cleared():
            self._recovered()
        self.health.write(os.getpid(), self.trouble)
        return line

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
            from tagd.tagging import tagger

            try:
                self.taggers = tagger.load_all(new)
            except Exception as exc:
                log.error("reload: %s; keeping the loaded models", exc)
                new = dataclasses.replace(new, models=self.config.models)
        self.config = new
        self._start_parts()
        self.notifier.ready(self._first_status())

    def _start_when_writable(self) -> bool:
        """Start the parts, waiting out a database that takes no writes (a full disk at boot)
        rather than exiting into a restart loop. False if stopped while waiting."""
        told_systemd = False
        while not self._stop_requested:
            try:
                self._start_parts()
                return True
            except (sqlite3.Error, db.DatabaseError) as exc:
                self._stop_parts()
                delay = self.trouble.failed(exc, self.config.database)
                line = f"{self.trouble.error}; not started, next try in {delay:.0f} s"
                log.error("%s", line)
                self.health.write(os.getpid(), self.trouble)
                if not told_systemd:
                    self.notifier.ready(line)
                    told_systemd = True
                else:
                    self.notifier.status(line)
                deadline = time.monotonic() + delay
                while not self._stop_requested and time.monotonic() < deadline:
                    time.sleep(TICK_S)
        return False

    def _first_status(self) -> str:
        try:
            line = self.publish()
        except (sqlite3.Error, db.DatabaseError) as exc:
            delay = self.trouble.failed(exc, self.config.database)
            line = f"{self.trouble.error}; not tagging, next try in {delay:.0f} s"
            log.error("%s", line)
        else:
            self.trouble.cleared()
        self.health.write(os.getpid(), self.trouble)
        return line

    def _record_stop(self, worker: Worker | None) -> None:
        if worker is not None and worker.last_error:
            # keep the last error for `tagd status` even if it came after the last tick
            with db.write(self.conn):
                db.set_state(self.conn, LAST_ERROR_KEY, worker.last_error)
        with db.write(self.conn):
            info = json.loads(db.get_state(self.conn, STATE_KEY) or "{}")
            info.update(
                heartbeat=time.time(),
                stopped=True,
                healthy=False,
                clean=self.exit_code == 0,
                exit_code=self.exit_code,
            )
            db.set_state(self.conn, STATE_KEY, json.dumps(info, sort_keys=True))

    def run(self) -> int:
        """Start everything, tell systemd we are ready, supervise until SIGTERM."""
        if not self._start_when_writable():
            self.notifier.stopping()
            self.health.close()
            self.conn.close()
            return self.exit_code
        self.notifier.ready(self._first_status())
        log.info(
            "tagd running: %d root%s, models %s on %s",
            len(self.config.watch),
            "" if len(self.config.watch) == 1 else "s",
            ", ".join(t.name for t in self.taggers),
            self.provider(),
        )
        ping_every = self.notifier.ping_interval()
        last_ping = last_line = 0.0
        self._last_status = self._last_heartbeat = time.monotonic()
        live = self._live_line()
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
                line = self.supervise_database(now)
                if line is not None:
                    self.notifier.status(line)
                    if self.counts and not self.trouble.active:
                        if live is not None:
                            self._show_live(live)
                        elif (
                            now - last_line >= self.config.daemon.progress_log_interval
                            and self._busy()
                        ):
                            log.info("progress: %s", self._progress_text())
                            last_line = now
                if ping_every is not None and now - last_ping >= ping_every and self.healthy():
                    self.notifier.watchdog()
                    last_ping = now
        finally:
            if live is not None:
                live.__exit__(None, None, None)
            self.notifier.stopping()
            log.info("stopping: finishing the batch in flight")
            worker = self.worker
            self._stop_parts()
            try:
                self._record_stop(worker)
            except (sqlite3.Error, db.DatabaseError) as exc:
                log.error("stopping: status not recorded: %s", exc)
            self.health.write(os.getpid(), self.trouble, stopped=True)
            self.health.close()
            self.conn.close()
        return self.exit_code
