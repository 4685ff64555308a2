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

from tagd import db, queue, results, sizing, store, workers
from tagd.config import Config
from tagd.decode import FileBytes
from tagd.preprocess import PreprocessSpec
from tagd.tagger import Tagger
from tagd.workers import Decoded, DecodePool, Decoder, Failed, Setup, Task

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


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    retrying: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)


def register(conn: sqlite3.Connection, tagger: Tagger, floor: float) -> store.ModelRecord:
    """Record a loaded model, its output → tag mapping and its head (for reindex)."""
    record = store.register_model(
        conn,
        name=tagger.name,
        family=tagger.family.name,
        source=tagger.config.source,
        revision=tagger.files.revision,
        labels=tagger.labels,
        settings={"thresholds": tagger.thresholds, "floor": floor},
    )
    if tagger.head is not None:
        results.save_head(conn, record, tagger.head)
    return record


def owner_id() -> str:
    """Lease owner: unique per process start, readable in `tagd jobs`."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"


def decode_and_prepare(
    file: FileBytes, specs: dict[str, PreprocessSpec], max_pixels: int
) -> tuple[int, int, str | None, dict[str, np.ndarray]]:
    """Decode once, preprocess for every model that needs this file. Raises DecodeError."""
    return workers.decode_and_prepare(file.data, specs, max_pixels)


def database_file(conn: sqlite3.Connection) -> str | None:
    """The main database's file, or None for an in-memory database."""
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            return row[2] or None
    return None


@dataclass
class _Batch:
    prepared: list[Prepared]
    scores: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]
    unchanged: list[tuple[queue.Job, FileBytes]]


_Item = _Batch | tuple[queue.Job, Failed]


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
        self.records: dict[str, store.ModelRecord] = {}
        self.rules = {
            t.name: results.resolve_rules(t.labels.names, t.labels.namespaces, config.tags)
            for t in self.taggers
        }
        self.database = database_file(conn)
        self._pool: DecodePool | None = None
        # Called with the running totals after each stored batch or failure (progress bars).
        self.on_progress: Callable[[Outcome], None] | None = None
        with db.write(conn):
            for t in self.taggers:
                self.records[t.name] = register(conn, t, config.floor_for(t.config))

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
        )

    def decoder_factory(self) -> Callable[[], Callable[[Task], Decoded | Failed]]:
        return functools.partial(Decoder, self.setup())

    def pool(self, *, small: bool = False) -> DecodePool:
        """Worker processes, started once and kept; a queue shorter than a batch and
        `decode_workers: 0` decode in this process (starting workers would cost more)."""
        if self._pool is not None:
            return self._pool
        workers = 0 if small else self.plan.decode_workers
        pool = DecodePool(self.decoder_factory(), workers)
        if workers:
            self._pool = pool
            log.info("%d decode workers, batch %d", workers, self.batch_size)
        return pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> Outcome:
        """Claim and process jobs until the queue has nothing runnable (or `stop()`)."""

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
        """Keep the decoders fed from `take`, run full batches, hand them to the store."""
        outcome = Outcome()
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
            """In-process decoding until a full batch shows there is a backlog to overlap."""
            backlog = len(jobs) == self.batch_size and self.plan.decode_workers > 0
            if pool is not None and (pool is self._pool or not backlog):
                return pool
            if pool is not None:
                while (result := pool.get()) is not None:
                    accept(result)
                pool.close()
            return self.pool(small=not backlog)

        try:
            while True:
                if exhausted:
                    pass
                elif stop():
                    exhausted = True
                    self._release(unfinished())
                    claimed.clear()
                    ready.clear()
                elif limit - len(claimed) - len(ready) >= self.batch_size:
                    jobs = take(self.batch_size)
                    exhausted = not jobs
                    if jobs:
                        pool = decoder_for(jobs)
                    for job in jobs:
                        claimed[job.id] = job
                        pool.submit(Task(job.id, job.path, names, job.force_models))  # type: ignore[union-attr]
                    continue
                if not claimed and not ready and exhausted:
                    break
                if len(ready) >= self.batch_size or (ready and exhausted and not claimed):
                    group, ready = ready[: self.batch_size], ready[self.batch_size :]
                    write(self._infer_batch(group))
                    continue
                result = pool.get(timeout=0.5) if pool is not None else None
                if result is not None:
                    accept(result)
        except BaseException:
            self._release(unfinished())
            if writer:
                writer.finish(raising=False)
            queue.release(self.conn, self.owner)
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
        file_id = store.file_id_for_sha(self.conn, sha256)
        done = store.models_done(self.conn, file_id) if file_id is not None else set()
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
            self.taggers, [(p.job.id, p.tensors) for p in prepared], self.batch_size
        )

    def _write(self, conn: sqlite3.Connection, item: _Item, outcome: Outcome) -> None:
        if isinstance(item, _Batch):
            self.store(item.prepared, item.scores, item.unchanged, outcome, conn=conn)
        else:
            job, failure = item
            if failure.gone:
                self._forget(job, conn)
            else:
                self._fail(job, failure.reason, failure.transient, outcome, conn)
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
                file_id = store.upsert_file(
                    conn, p.file.sha256, p.file.size, p.width, p.height, p.format
                )
                store.upsert_path(conn, p.job.path, file_id, p.file.size, p.file.mtime_ns)
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
                file_id = store.file_id_for_sha(conn, file.sha256)
                store.upsert_path(conn, job.path, file_id, file.size, file.mtime_ns)
                if queue.complete(conn, job, self.owner):
                    outcome.done += 1

    def _forget(self, job: queue.Job, conn: sqlite3.Connection) -> None:
        """The file was deleted or moved away before we got to it: nothing left to do."""
        with db.write(conn):
            queue.drop(conn, job, self.owner)
            conn.execute("UPDATE paths SET missing = 1 WHERE path = ?", (job.path,))
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


def infer_tensors(
    taggers: Sequence[Tagger],
    items: Sequence[tuple[int, dict[str, np.ndarray]]],
    batch_size: int,
) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]:
    """The batching both the local pipeline and a cluster worker run, so results match."""
    out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
    for tagger in taggers:
        mine = [(key, tensors) for key, tensors in items if tagger.name in tensors]
        size = tagger.config.batch_size or batch_size
        for start in range(0, len(mine), size):
            chunk = mine[start : start + size]
            batch = np.stack([tensors[tagger.name] for _, tensors in chunk])
            pad = size if tagger.on_gpu else None
            probs, emb = tagger.predict_with_embeddings(batch, pad_to=pad)
            for i, (key, _) in enumerate(chunk):
                out[(key, tagger.name)] = (probs[i], None if emb is None else emb[i])
    return out


def _prepared(job: queue.Job, d: Decoded) -> Prepared | tuple[queue.Job, FileBytes]:
    file = FileBytes(b"", d.sha256, d.size, d.mtime_ns)
    if not d.tensors:
        return (job, file)
    return Prepared(job, file, d.width, d.height, d.format, d.tensors)


def _job_of(item: Prepared | tuple[queue.Job, FileBytes]) -> queue.Job:
    return item.job if isinstance(item, Prepared) else item[0]
