"""The tagging pipeline: claimed jobs → read + hash + decode + preprocess → infer → store.

One pipeline serves `tagd scan` (drain the queue once) and the daemon's worker. The stages
overlap: decode workers (tagd/workers.py) prepare the next files while the calling thread runs
the model on the current batch, and a store thread with its own SQLite connection writes each
finished batch in one transaction. Queues between the stages are bounded, so memory stays flat
whatever the backlog.
"""

from __future__ import annotations

import functools
import logging
import os
import queue as stdqueue
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tagd.config import Config
from tagd.index import db, models, paths
from tagd.index import jobs as queue
from tagd.index import scores as score_rows
from tagd.tagging import media, results, sizing, tagrules, workers
from tagd.tagging.decode import FileBytes
from tagd.tagging.graph import Head
from tagd.tagging.media import MediaInfo, frames_of
from tagd.tagging.preprocess import PreprocessSpec
from tagd.tagging.tagger import Tagger
from tagd.tagging.workers import Decoded, DecodePool, Decoder, Failed, Setup, Task

__all__ = ["Outcome", "Pipeline", "Prepared", "decode_and_prepare", "infer_tensors", "owner_id"]

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A decoded job: tensors for each model that still needs it.

    `file.data` is empty: the bytes stay in the worker that hashed and decoded them.
    """

    job: queue.Job
    file: FileBytes
    width: int | None
    height: int | None
    format: str | None
    tensors: dict[str, np.ndarray]
    media: MediaInfo | None = None


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    retrying: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def register(
    conn: sqlite3.Connection, tagger: Tagger, floor: float, *, head: bool = True
) -> models.ModelRecord:
    """Record a loaded model, its output → tag mapping and (with `head`) its head, for
    reindex."""
    record = models.register_model(
        conn,
        name=tagger.name,
        family=tagger.family.name,
        source=tagger.config.source,
        revision=tagger.files.revision,
        labels=tagger.labels,
        settings={
            "thresholds": tagger.thresholds,
            "floor": floor,
            **tag_thresholds_setting(tagger.labels.thresholds),
            **({"file_thresholds": tagger.file_thresholds} if tagger.file_thresholds else {}),
        },
    )
    if head and tagger.head is not None:
        results.save_head(conn, record, tagger.head)
    return record


def tag_thresholds_setting(values: tuple[float, ...] | None) -> dict[str, object]:
    """A model's own per-tag thresholds as JSON (NaN → null), for `tagd reindex`."""
    if values is None:
        return {}
    return {"tag_thresholds": [None if v != v else v for v in values]}


def store_file(
    conn: sqlite3.Connection,
    path: str,
    file: FileBytes,
    width: int | None,
    height: int | None,
    fmt: str | None,
) -> int:
    """The file row and its path, as every writer of results records them; returns the id."""
    file_id = paths.upsert_file(conn, file.sha256, file.size, width, height, fmt)
    paths.upsert_path(conn, path, file_id, file.size, file.mtime_ns)
    return file_id


def owner_id() -> str:
    """Lease owner: host, pid and the process's start time (clock ticks since boot), so any
    tagd on this host can tell whether the owner still runs (queue.owner_alive)."""
    pid = os.getpid()
    start = queue.process_start(pid) or f"{time.time():.0f}"
    return f"{socket.gethostname()}:{pid}:{start}"


def decode_and_prepare(
    file: FileBytes,
    specs: dict[str, PreprocessSpec],
    max_pixels: int,
    *,
    budget: int | None = None,
) -> tuple[int, int, str | None, dict[str, np.ndarray]]:
    """Decode once, preprocess for every model that needs this file. Raises DecodeError."""
    return workers.decode_and_prepare(file.data, specs, max_pixels, budget=budget)


@dataclass
class _Batch:
    prepared: list[Prepared]
    scores: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]
    unchanged: list[tuple[queue.Job, FileBytes]]


@dataclass
class _Heads:
    """Models' heads to store: tens of megabytes, written by the store thread while the
    first image is decoded and run, not before it."""

    heads: list[tuple[models.ModelRecord, Head]]


_Item = _Batch | _Heads | tuple[queue.Job, Failed]


class _StoreThread(threading.Thread):
    """Writes batches and failures in order, off the inference thread, on its own connection."""

    def __init__(self, pipeline: Pipeline, path: str, outcome: Outcome) -> None:
        super().__init__(name="tagd-store", daemon=True)
        self.pipeline = pipeline
        self.path = path
        self.outcome = outcome
        self.items: stdqueue.Queue[_Item | None] = stdqueue.Queue(maxsize=2)
        self.error: BaseException | None = None

    def run(self) -> None:
        conn = None
        try:
            conn = db.connect(self.path)
            while (item := self.items.get()) is not None:
                self.pipeline._write(conn, item, self.outcome)
        except BaseException as exc:
            self.error = exc
            while self.items.get() is not None:
                pass
        finally:
            if conn is not None:
                conn.close()

    def put(self, item: _Item) -> None:
        if self.error is not None:
            raise self.error
        self.items.put(item)

    def finish(self, *, raising: bool) -> None:
        self.items.put(None)
        self.join()
        if self.error is not None:
            if raising:
                raise self.error
            log.error("store thread failed: %s", self.error)


class Pipeline:
    def __init__(
        self,
        conn: sqlite3.Connection,
        config: Config,
        taggers: Sequence[Tagger],
        *,
        owner: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.taggers = list(taggers)
        self.owner = owner or owner_id()
        gpu = any(t.on_gpu for t in self.taggers)
        self.plan = sizing.plan(config.inference, gpu=gpu, cores=sizing.available_cores())
        self.batch_size = batch_size or self.plan.batch_size
        self.records: dict[str, models.ModelRecord] = {}
        tag_rules = tagrules.effective(conn, config.tags)
        self.rules = {
            t.name: results.resolve_rules(
                t.labels.names, t.labels.namespaces, tag_rules, t.labels.thresholds
            )
            for t in self.taggers
        }
        self.database = db.database_file(conn)
        self._pool: DecodePool | None = None
        self._marks: sqlite3.Connection | None = None
        self._marks_lock = threading.Lock()
        # Called with the running totals after each stored batch or failure (progress bars).
        self.on_progress: Callable[[Outcome], None] | None = None
        with db.write(conn):
            for t in self.taggers:
                self.records[t.name] = register(conn, t, config.floor_for(t.config), head=False)
        self._heads = [(self.records[t.name], t.head) for t in self.taggers if t.head is not None]

    @property
    def model_ids(self) -> list[int]:
        return [r.id for r in self.records.values()]

    @property
    def in_flight_limit(self) -> int:
        """Jobs claimed but not yet stored: two batches plus what the workers hold."""
        return 2 * self.batch_size + 2 * max(1, self.plan.decode_workers)

    def setup(self) -> Setup:
        return Setup(
            specs={t.name: t.spec for t in self.taggers},
            model_ids={name: r.id for name, r in self.records.items()},
            max_pixels=self.config.max_image_pixels,
            database=self.database,
            memory_budget=self.memory_budget,
            max_file_bytes=self.config.inference.max_file_mb << 20,
            video=self.config.video,
        )

    @property
    def memory_budget(self) -> int:
        """Bytes one decode may use: the workers' share of RAM (the tagd process's own share
        when it decodes in-process)."""
        return sizing.worker_memory(self.config.inference, max(1, self.plan.decode_workers))

    def decoder_factory(self) -> Callable[[], Callable[[Task], Decoded | Failed]]:
        return functools.partial(Decoder, self.setup())

    def pool(self, *, small: bool = False) -> DecodePool:
        """Worker processes, started once and kept: one for a queue shorter than a batch (the
        daemon's trickle), all of them once a full batch shows a backlog. Untrusted files are
        decoded in a worker even then, so a hang is timed out and memory capped; only
        `decode_workers: 0` decodes in this process, without either."""
        if self.plan.decode_workers == 0:
            return DecodePool(self.decoder_factory(), 0, on_suspect=self._suspect_hook())
        workers = 1 if small else self.plan.decode_workers
        if self._pool is None:
            self._pool = DecodePool(
                self.decoder_factory(),
                workers,
                timeout=self.config.inference.decode_timeout,
                memory_limit=self.memory_budget,
                on_suspect=self._suspect_hook(),
            )
            log.info("%d decode workers, batch %d", workers, self.batch_size)
        elif self._pool.size < workers:
            self._pool.grow(workers)
            log.info("%d decode workers, batch %d", workers, self.batch_size)
        return self._pool

    def _suspect_hook(self) -> Callable[[int, bool], None] | None:
        return self._mark if self.database is not None else None

    def _mark(self, job_id: int, decoding: bool) -> None:
        """Written from the decode thread (or before each in-process decode) on a connection
        of its own: if tagd dies now, the lease reaper charges this job and no other."""
        assert self.database is not None
        with self._marks_lock:
            if self._marks is None:
                self._marks = db.connect(self.database)
            queue.mark_decoding(self._marks, job_id, self.owner, decoding)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        with self._marks_lock:
            if self._marks is not None:
                self._marks.close()
                self._marks = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reap_orphans(self) -> None:
        """Take back at once the jobs a killed tagd on this host left leased."""
        reaped = queue.reap_orphans(
            self.conn,
            self.owner,
            socket.gethostname(),
            max_attempts=self.config.daemon.max_attempts,
        )
        if reaped:
            log.info("%d jobs left running by a stopped tagd are queued again", reaped)

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> Outcome:
        """Claim and process jobs until the queue has nothing runnable (or `stop()`)."""

        self.reap_orphans()

        def take(room: int) -> list[queue.Job]:
            if stop():
                return []
            return queue.claim(
                self.conn,
                self.owner,
                room,
                lease_s=self.config.daemon.lease_seconds,
                max_attempts=self.config.daemon.max_attempts,
            )

        return self._drive(take, stop)

    def process(self, jobs: Sequence[queue.Job]) -> Outcome:
        """Tag jobs this owner has already claimed."""
        rest = list(jobs)

        def take(room: int) -> list[queue.Job]:
            chunk = rest[:room]
            del rest[:room]
            return chunk

        return self._drive(take, lambda: False)

    def _drive(self, take: Callable[[int], list[queue.Job]], stop: Callable[[], bool]) -> Outcome:
        """Keep the decoders fed from `take`, run full batches, hand them to the store.

        The first batch is one image, and nothing else is decoded while it runs: the first
        result (and progress) comes as soon as one file is decoded and run, not a full batch
        later, and no decoder takes cores from that run (a ViT-B on 2 CPU cores: first stored
        result 3.3-3.9 s -> 1.6-1.7 s; on a GPU the batch is padded to its one shape anyway).
        The decoders then start a batch behind, once per run: ~0.1 s."""
        outcome = Outcome()
        want = 1
        limit = self.in_flight_limit
        names = tuple(t.name for t in self.taggers)
        claimed: dict[int, queue.Job] = {}
        ready: list[Prepared | tuple[queue.Job, FileBytes]] = []
        exhausted = False
        pool: DecodePool | None = None
        writer = _StoreThread(self, self.database, outcome) if self.database else None
        if writer:
            writer.start()
            write: Callable[[_Item], None] = writer.put
        else:
            write = functools.partial(self._write, self.conn, outcome=outcome)
        if self._heads:
            heads, self._heads = self._heads, []
            write(_Heads(heads))

        def unfinished() -> list[queue.Job]:
            return list(claimed.values()) + [_job_of(r) for r in ready]

        def accept(result: Decoded | Failed) -> None:
            job = claimed.pop(result.task_id, None)
            if job is None:
                return  # a file released by an earlier stop
            if isinstance(result, Failed):
                write((job, result))
            else:
                ready.append(_prepared(job, result))

        def decoder_for(jobs: list[queue.Job]) -> DecodePool:
            """One worker until a full batch shows there is a backlog to overlap."""
            if pool is not None and pool is not self._pool:
                return pool  # in-process decoding (decode_workers: 0)
            return self.pool(small=len(jobs) < self.batch_size)

        try:
            while True:
                if exhausted:
                    pass
                elif stop():
                    exhausted = True
                    self._release(unfinished())
                    claimed.clear()
                    ready.clear()
                elif want == 1 and (claimed or ready):
                    pass  # the first image alone: nothing decodes beside its run
                elif limit - len(claimed) - len(ready) >= self.batch_size:
                    jobs = take(want)
                    exhausted = not jobs
                    if jobs:
                        pool = decoder_for(jobs)
                    for job in jobs:
                        claimed[job.id] = job
                        pool.submit(Task(job.id, job.path, names, job.force_models))  # type: ignore[union-attr]
                    continue
                if not claimed and not ready and exhausted:
                    break
                if len(ready) >= want or (ready and exhausted and not claimed):
                    group, ready = ready[:want], ready[want:]
                    write(self._infer_batch(group))
                    want = self.batch_size
                    continue
                result = pool.get(timeout=0.5) if pool is not None else None
                if result is not None:
                    accept(result)
        except BaseException:
            try:
                self._release(unfinished())
            except sqlite3.Error as exc:
                # The daemon's worker releases them once the database takes writes again.
                log.debug("jobs not released: %s", exc)
            if writer:
                writer.finish(raising=False)
            try:
                queue.release(self.conn, self.owner)
            except sqlite3.Error as exc:
                log.debug("jobs not released: %s", exc)
            raise
        finally:
            if pool is not None and pool is not self._pool:
                pool.close()
        if writer:
            writer.finish(raising=True)
        return outcome

    def _release(self, jobs: list[queue.Job]) -> None:
        if jobs:
            queue.release(self.conn, self.owner, [j.id for j in jobs])

    def _infer_batch(self, group: Sequence[Prepared | tuple[queue.Job, FileBytes]]) -> _Batch:
        prepared = [p for p in group if isinstance(p, Prepared)]
        unchanged = [u for u in group if not isinstance(u, Prepared)]
        if self.database is None:
            prepared, more = self._drop_done(prepared)
            unchanged += more
        return _Batch(prepared, self.infer(prepared), unchanged)

    def _drop_done(
        self, prepared: list[Prepared]
    ) -> tuple[list[Prepared], list[tuple[queue.Job, FileBytes]]]:
        """Without a database file the workers cannot check earlier results: check here."""
        keep: list[Prepared] = []
        unchanged: list[tuple[queue.Job, FileBytes]] = []
        for p in prepared:
            needed = {t.name for t in self.needed(p.job, p.file.sha256)}
            p.tensors = {k: v for k, v in p.tensors.items() if k in needed}
            (keep.append(p) if p.tensors else unchanged.append((p.job, p.file)))
        return keep, unchanged

    def needed(self, job: queue.Job, sha256: str) -> list[Tagger]:
        """Models that have no result for this content yet, plus any the job forces."""
        file_id = paths.file_id_for_sha(self.conn, sha256)
        done = score_rows.models_done(self.conn, file_id) if file_id is not None else set()
        return [
            t
            for t in self.taggers
            if self.records[t.name].id not in done or t.name in job.force_models
        ]

    def infer(
        self, prepared: Sequence[Prepared]
    ) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]:
        """Per-model batches; returns {(job id, model name): (probabilities, embedding)}.

        On a GPU a short batch is padded to the full batch size (one input shape per session).
        """
        return infer_tensors(
            self.taggers,
            [(p.job.id, p.tensors) for p in prepared],
            self.batch_size,
            aggregate=self.config.video.aggregate,
        )

    def _write(self, conn: sqlite3.Connection, item: _Item, outcome: Outcome) -> None:
        if isinstance(item, _Heads):
            with db.write(conn):
                for record, head in item.heads:
                    results.save_head(conn, record, head)
            return
        if isinstance(item, _Batch):
            self.store(item.prepared, item.scores, item.unchanged, outcome, conn=conn)
        else:
            job, failure = item
            if failure.gone:
                self._forget(job, conn)
            else:
                transient = failure.transient
                if failure.incomplete and self._settled(job.path):
                    transient = False
                self._fail(job, failure.reason, transient, outcome, conn)
        if self.on_progress is not None:
            self.on_progress(outcome)

    def store(
        self,
        prepared: Sequence[Prepared],
        scores: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]],
        unchanged: Sequence[tuple[queue.Job, FileBytes]],
        outcome: Outcome,
        *,
        conn: sqlite3.Connection | None = None,
    ) -> None:
        """All results of the batch and their job completions in one transaction."""
        conn = conn or self.conn
        by_name = {t.name: t for t in self.taggers}
        with db.write(conn):
            for p in prepared:
                file_id = store_file(conn, p.job.path, p.file, p.width, p.height, p.format)
                if p.media is not None:
                    media.save_info(conn, file_id, p.media)
                for name in p.tensors:
                    tagger = by_name[name]
                    probs, emb = scores[(p.job.id, name)]
                    results.save(
                        conn,
                        file_id=file_id,
                        model=self.records[name],
                        scores=probs,
                        thresholds=tagger.thresholds,
                        rules=self.rules[name],
                        floor=self.config.floor_for(tagger.config),
                        embedding=emb,
                    )
                if queue.complete(conn, p.job, self.owner):
                    outcome.done += 1
            for job, file in unchanged:
                known = paths.file_id_for_sha(conn, file.sha256)
                # The worker found this content in the index; files rows are never deleted.
                assert known is not None, file.sha256
                paths.upsert_path(conn, job.path, known, file.size, file.mtime_ns)
                if queue.complete(conn, job, self.owner):
                    outcome.done += 1

    def _forget(self, job: queue.Job, conn: sqlite3.Connection) -> None:
        """The file was deleted or moved away before we got to it: nothing left to do."""
        with db.write(conn):
            queue.drop(conn, job, self.owner)
            paths.mark_missing(conn, job.path)
        log.info("gone before tagging: %s", job.path)

    def _fail(
        self,
        job: queue.Job,
        reason: str,
        transient: bool,
        outcome: Outcome,
        conn: sqlite3.Connection,
    ) -> None:
        with db.write(conn):
            state = queue.fail(
                conn,
                job,
                self.owner,
                reason,
                transient=transient,
                max_attempts=self.config.daemon.max_attempts,
                backoff_s=self.config.daemon.retry_backoff,
            )
        if state == "failed":
            outcome.failed += 1
            outcome.errors.append((job.path, reason))
            log.warning("failed: %s: %s", job.path, reason)
        else:
            outcome.retrying += 1
            log.info("will retry: %s: %s", job.path, reason)

    def _settled(self, path: str) -> bool:
        """A file not modified for longer than the settle time is not being copied: a
        truncated or empty one stays that way, so waiting for it would only delay the verdict."""
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return False
        return time.time() - mtime > self.config.daemon.settle_seconds


def infer_tensors(
    taggers: Sequence[Tagger],
    items: Sequence[tuple[int, dict[str, np.ndarray]]],
    batch_size: int,
    *,
    aggregate: str = "max",
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]:
    """The batching both the local pipeline and a cluster worker run, so results match.

    Videos and animations carry several frames: batches are of frames, and each file's
    frames are aggregated afterwards (tagd.media.aggregate)."""
    out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
    for tagger in taggers:
        mine = [(key, tensors[tagger.name]) for key, tensors in items if tagger.name in tensors]
        size = tagger.config.batch_size or batch_size
        rows = [(i, f) for i, (_, t) in enumerate(mine) for f in frames_of(t)]
        if not rows:
            continue
        owner = np.asarray([i for i, _ in rows], dtype=np.int64)
        probs_parts: list[np.ndarray] = []
        emb_parts: list[np.ndarray | None] = []
        for start in range(0, len(rows), size):
            batch = np.stack([f for _, f in rows[start : start + size]])
            pad = size if tagger.on_gpu else None
            probs, emb = tagger.predict_with_embeddings(batch, pad_to=pad)
            probs_parts.append(probs)
            emb_parts.append(emb)
        all_probs = np.concatenate(probs_parts)
        embs = [e for e in emb_parts if e is not None]
        all_emb = np.concatenate(embs) if len(embs) == len(emb_parts) else None
        for i, (key, _) in enumerate(mine):
            sel = owner == i
            out[(key, tagger.name)] = media.aggregate(
                all_probs[sel], None if all_emb is None else all_emb[sel], aggregate
            )
    return out


def _prepared(job: queue.Job, d: Decoded) -> Prepared | tuple[queue.Job, FileBytes]:
    file = FileBytes(b"", d.sha256, d.size, d.mtime_ns)
    if not d.tensors:
        return (job, file)
    return Prepared(job, file, d.width, d.height, d.format, d.tensors, d.media)


def _job_of(item: Prepared | tuple[queue.Job, FileBytes]) -> queue.Job:
    return item.job if isinstance(item, Prepared) else item[0]
