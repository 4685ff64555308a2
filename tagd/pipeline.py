"""The tagging pipeline: claimed jobs → read + hash → decode + preprocess → infer → store.

One pipeline serves `tagd scan` (drain the queue once) and the daemon's worker. Stages are
separate functions so each can be moved to its own worker without changing the others.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from tagd import db, queue, results, store
from tagd.config import Config
from tagd.decode import DecodeError, FileBytes, open_image, read_file
from tagd.preprocess import PreprocessSpec, prepare
from tagd.tagger import Tagger

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A job whose file was read and decoded: tensors for each model that still needs it."""

    job: queue.Job
    file: FileBytes
    width: int
    height: int
    format: str | None
    tensors: dict[str, np.ndarray]


@dataclass
class Outcome:
    done: int = 0
    failed: int = 0
    retrying: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        self.done += other.done
        self.failed += other.failed
        self.retrying += other.retrying
        self.errors.extend(other.errors)


def owner_id() -> str:
    """Lease owner: unique per process start, readable in `tagd jobs`."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time():.0f}"


def decode_and_prepare(
    file: FileBytes, specs: dict[str, PreprocessSpec], max_pixels: int
) -> tuple[int, int, str | None, dict[str, np.ndarray]]:
    """Decode once, preprocess for every model that needs this file. Raises DecodeError."""
    image = open_image(file.data, max_pixels=max_pixels)
    try:
        width, height = image.size
        fmt = image.format
        tensors = {name: prepare(image, spec) for name, spec in specs.items()}
    finally:
        image.close()
    return width, height, fmt, tensors


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
        self.batch_size = batch_size or config.inference.batch_size or 8
        self.records: dict[str, store.ModelRecord] = {}
        self.rules = {
            t.name: results.resolve_rules(t.labels.names, t.labels.namespaces, config.tags)
            for t in self.taggers
        }
        with db.write(conn):
            for t in self.taggers:
                self.records[t.name] = store.register_model(
                    conn,
                    name=t.name,
                    family=t.family.name,
                    source=t.config.source,
                    revision=t.files.revision,
                    labels=t.labels,
                    settings={"thresholds": t.thresholds, "floor": config.floor_for(t.config)},
                )
                if t.head is not None:
                    results.save_head(conn, self.records[t.name], t.head)

    @property
    def model_ids(self) -> list[int]:
        return [r.id for r in self.records.values()]

    def needed(self, job: queue.Job, sha256: str) -> list[Tagger]:
        """Models that have no result for this content yet, plus any the job forces."""
        file_id = store.file_id_for_sha(self.conn, sha256)
        done = store.models_done(self.conn, file_id) if file_id is not None else set()
        return [
            t
            for t in self.taggers
            if self.records[t.name].id not in done or t.name in job.force_models
        ]

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> Outcome:
        """Claim and process batches until the queue has nothing runnable (or `stop()`)."""
        total = Outcome()
        while not stop():
            jobs = queue.claim(
                self.conn,
                self.owner,
                self.batch_size,
                lease_s=self.config.daemon.lease_seconds,
                max_attempts=self.config.daemon.max_attempts,
            )
            if not jobs:
                break
            total.add(self.process(jobs))
        return total

    def process(self, jobs: Sequence[queue.Job]) -> Outcome:
        outcome = Outcome()
        prepared: list[Prepared] = []
        unchanged: list[tuple[queue.Job, FileBytes]] = []
        for job in jobs:
            try:
                file = read_file(job.path)
                todo = self.needed(job, file.sha256)
                if not todo:
                    unchanged.append((job, file))
                    continue
                specs = {t.name: t.spec for t in todo}
                w, h, fmt, tensors = decode_and_prepare(file, specs, self.config.max_image_pixels)
            except DecodeError as exc:
                if exc.gone:
                    self._forget(job)
                else:
                    self._fail(job, exc.reason, exc.transient, outcome)
                continue
            except (MemoryError, Exception) as exc:
                # A decoder bug on one hostile file must not take the batch down with it.
                log.exception("unexpected error decoding %s", job.path)
                self._fail(job, f"decoder error: {type(exc).__name__}: {exc}", False, outcome)
                continue
            prepared.append(Prepared(job, file, w, h, fmt, tensors))
        try:
            scores = self.infer(prepared)
            self.store(prepared, scores, unchanged, outcome)
        except BaseException:
            queue.release(self.conn, self.owner, [j.id for j in jobs])
            raise
        return outcome

    def infer(
        self, prepared: Sequence[Prepared]
    ) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]]:
        """Per-model batches; returns {(job id, model name): (probabilities, embedding)}."""
        out: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
        for tagger in self.taggers:
            items = [p for p in prepared if tagger.name in p.tensors]
            if not items:
                continue
            batch = np.stack([p.tensors[tagger.name] for p in items])
            probs, emb = tagger.predict_with_embeddings(batch)
            for i, p in enumerate(items):
                out[(p.job.id, tagger.name)] = (probs[i], None if emb is None else emb[i])
        return out

    def store(
        self,
        prepared: Sequence[Prepared],
        scores: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]],
        unchanged: Sequence[tuple[queue.Job, FileBytes]],
        outcome: Outcome,
    ) -> None:
        """All results of the batch and their job completions in one transaction."""
        by_name = {t.name: t for t in self.taggers}
        with db.write(self.conn):
            for p in prepared:
                file_id = store.upsert_file(
                    self.conn, p.file.sha256, p.file.size, p.width, p.height, p.format
                )
                store.upsert_path(self.conn, p.job.path, file_id, p.file.size, p.file.mtime_ns)
                for name in p.tensors:
                    tagger = by_name[name]
                    probs, emb = scores[(p.job.id, name)]
                    results.save(
                        self.conn,
                        file_id=file_id,
                        model=self.records[name],
                        scores=probs,
                        namespaces=tagger.labels.namespaces,
                        thresholds=tagger.thresholds,
                        rules=self.rules[name],
                        floor=self.config.floor_for(tagger.config),
                        embedding=emb,
                    )
                if queue.complete(self.conn, p.job, self.owner):
                    outcome.done += 1
            for job, file in unchanged:
                file_id = store.file_id_for_sha(self.conn, file.sha256)
                store.upsert_path(self.conn, job.path, file_id, file.size, file.mtime_ns)
                if queue.complete(self.conn, job, self.owner):
                    outcome.done += 1

    def _forget(self, job: queue.Job) -> None:
        """The file was deleted or moved away before we got to it: nothing left to do."""
        with db.write(self.conn):
            queue.drop(self.conn, job, self.owner)
            self.conn.execute("UPDATE paths SET missing = 1 WHERE path = ?", (job.path,))
        log.info("gone before tagging: %s", job.path)

    def _fail(self, job: queue.Job, reason: str, transient: bool, outcome: Outcome) -> None:
        with db.write(self.conn):
            state = queue.fail(
                self.conn,
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
