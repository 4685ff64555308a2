"""Read + hash + decode + preprocess in worker processes, ahead of the model.

Pillow holds the GIL through much of its work, so decoding runs in separate processes
(forkserver/spawn: ONNX Runtime and CUDA state must never be forked). Each worker has its own
task and result pipes and at most `depth` tasks outstanding, so memory stays bounded and a
worker that dies (a decoder crash) costs exactly the file it was on: its oldest outstanding
task fails, the others go back to the queue, and a fresh worker takes its place.

This module must not import onnxruntime: it is what the worker processes load.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import queue as stdqueue
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

import numpy as np
from PIL import Image

from tagd import media
from tagd.config import VideoSettings
from tagd.decode import DecodeError, FileBytes, open_image, read_file
from tagd.media import MediaInfo
from tagd.preprocess import PreprocessSpec, prepare

log = logging.getLogger(__name__)

DEPTH = 2


@dataclass(frozen=True)
class Task:
    id: int
    path: str
    models: tuple[str, ...]
    force: tuple[str, ...] = ()


@dataclass
class Decoded:
    """A read file: identity always; pixels and tensors only for models that still need it."""

    task_id: int
    sha256: str
    size: int
    mtime_ns: int
    width: int | None = None
    height: int | None = None
    format: str | None = None
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    # Videos and animations (tagd.media): duration, frames, fps; tensors then hold N frames.
    media: MediaInfo | None = None


@dataclass(frozen=True)
class Failed:
    task_id: int
    reason: str
    transient: bool = False
    gone: bool = False


Result = Decoded | Failed


@dataclass(frozen=True)
class Setup:
    """What every worker needs; picklable. `database` (read-only) answers "already tagged?"."""

    specs: dict[str, PreprocessSpec]
    model_ids: dict[str, int]
    max_pixels: int
    database: str | None = None
    video: VideoSettings = field(default_factory=VideoSettings)


def draft_size(specs: list[PreprocessSpec]) -> tuple[int, int]:
    """JPEG draft target: the decoded image stays >= every model input on both axes."""
    side = max(max(s.size) for s in specs)
    return side, side


def shrink(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """What draft does for JPEG, for the other formats: an integer box reduction that keeps
    the image >= `target` on both axes, so the final resize works on far fewer pixels.
    Images with transparency are left alone (box-averaging would bleed hidden colours)."""
    factor = min(image.width // target[0], image.height // target[1])
    if factor < 2 or image.mode not in ("RGB", "L") or "transparency" in image.info:
        return image
    return image.reduce(factor)


def decode_and_prepare(
    data: bytes, specs: dict[str, PreprocessSpec], max_pixels: int, *, draft: bool = True
) -> tuple[int, int, str | None, dict[str, np.ndarray]]:
    """Decode once, preprocess for every model in `specs`. Raises DecodeError.

    With `draft`, an image much larger than the inputs is scaled down early (JPEG: by the DCT
    while decoding; others: box reduction), staying >= every input on both axes; the
    reported width/height are still those of the full image.
    """
    target = draft_size(list(specs.values())) if draft and specs else None
    image = open_image(data, max_pixels=max_pixels, draft=target)
    try:
        full = image.info.get("full_size", image.size)
        fmt = image.format
        small = shrink(image, target) if target else image
        tensors = {name: compact(prepare(small, spec), spec) for name, spec in specs.items()}
    finally:
        image.close()
    return full[0], full[1], fmt, tensors


def compact(tensor: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Raw 0-255 inputs (the WD family) travel as uint8: exact, and a quarter of the bytes to
    pickle through the worker pipe; the tagger widens them to float32 for the session."""
    raw = spec.scale == 1.0 and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    if raw and spec.fit != "fit-tensor":
        return tensor.astype(np.uint8)
    return tensor


class Decoder:
    """One worker's state: turns a Task into a Result, never raises for a bad file."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._conn: sqlite3.Connection | None = None

    def done_models(self, sha256: str) -> set[str]:
        if self.setup.database is None:
            return set()
        if self._conn is None:
            uri = f"file:{self.setup.database}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=30.0)
        rows = self._conn.execute(
            "SELECT t.model_id FROM taggings t JOIN files f ON f.id = t.file_id WHERE f.sha256 = ?",
            (sha256,),
        ).fetchall()
        ids = {r[0] for r in rows}
        return {name for name, mid in self.setup.model_ids.items() if mid in ids}

    def __call__(self, task: Task) -> Result:
        by_path = media.is_video_path(task.path)
        try:
            # Videos are hashed in chunks and decoded from the path, never read whole.
            file = FileBytes(b"", *media.hash_file(task.path)) if by_path else read_file(task.path)
        except DecodeError as exc:
            return Failed(task.id, exc.reason, exc.transient, exc.gone)
        try:
            done = self.done_models(file.sha256)
        except sqlite3.Error as exc:
            log.warning("cannot check earlier results for %s: %s", task.path, exc)
            done = set()
        todo = [m for m in task.models if m not in done or m in task.force]
        result = Decoded(task.id, file.sha256, file.size, file.mtime_ns)
        if not todo:
            return result
        specs = {m: self.setup.specs[m] for m in todo}
        try:
            fmt: str | None
            target = draft_size(list(specs.values()))
            source = task.path if by_path else file.data
            found = media.decode(source, specs, self.setup.max_pixels, self.setup.video, target)
            if found is not None:
                w, h, fmt, tensors, result.media = found
                if by_path and media.changed(task.path, file.size, file.mtime_ns):
                    raise DecodeError("the file changed while it was read", transient=True)
            else:
                w, h, fmt, tensors = decode_and_prepare(file.data, specs, self.setup.max_pixels)
        except DecodeError as exc:
            return Failed(task.id, exc.reason, exc.transient)
        except (MemoryError, Exception) as exc:
            # A decoder bug on one hostile file must not take the batch down with it.
            log.exception("unexpected error decoding %s", task.path)
            return Failed(task.id, f"decoder error: {type(exc).__name__}: {exc}")
        result.width, result.height, result.format, result.tensors = w, h, fmt, tensors
        return result


def _worker_main(
    factory: Callable[[], Callable[[Task], Result]], tasks: Connection, results: Connection
) -> None:
    """Worker loop: leaves when the parent closes the pipe, sends None, or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    handle = factory()
    while True:
        try:
            if not tasks.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        results.send(handle(task))


def _context() -> mp.context.BaseContext:
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tagd.workers"])
        return ctx
    return mp.get_context("spawn")


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    tasks: Connection
    results: Connection
    outstanding: collections.deque[Task] = field(default_factory=collections.deque)


class DecodePool:
    """`submit(task)` never blocks and `get()` returns results in completion order.

    Callers bound the number of tasks in flight; the pool keeps each worker `depth` deep.
    With `workers == 0` tasks are handled in the calling thread, inside `get()`.
    """

    def __init__(
        self,
        factory: Callable[[], Callable[[Task], Result]],
        workers: int,
        *,
        depth: int = DEPTH,
    ) -> None:
        self.factory = factory
        self.size = workers
        self.depth = depth
        self.crashes = 0
        self._pending: collections.deque[Task] = collections.deque()
        self._out: stdqueue.Queue[Result] = stdqueue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._workers: list[_Worker] = []
        self._inline: Callable[[Task], Result] | None = None
        if workers == 0:
            self._inline = factory()
            return
        self._ctx = _context()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._workers = [self._spawn() for _ in range(workers)]
        self._thread = threading.Thread(target=self._dispatch, name="tagd-decode", daemon=True)
        self._thread.start()

    def _spawn(self) -> _Worker:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.factory, task_r, result_w),
            name="tagd-decoder",
            daemon=True,
        )
        proc.start()
        task_r.close()
        result_w.close()
        return _Worker(proc, task_w, result_r)

    @property
    def pids(self) -> list[int | None]:
        return [w.process.pid for w in self._workers]

    def submit(self, task: Task) -> None:
        if self._inline is not None:
            self._pending.append(task)
            return
        with self._lock:
            self._pending.append(task)
            self._assign()
        self._wake_w.send_bytes(b"!")

    def get(self, timeout: float | None = None) -> Result | None:
        """The next finished result, or None after `timeout` seconds without one."""
        if self._inline is not None:
            return self._inline(self._pending.popleft()) if self._pending else None
        try:
            return self._out.get(timeout=timeout)
        except stdqueue.Empty:
            return None

    def _assign(self) -> None:
        """Hand pending tasks to the least loaded workers (call with the lock held)."""
        while self._pending:
            worker = min(self._workers, key=lambda w: len(w.outstanding))
            if len(worker.outstanding) >= self.depth:
                return
            task = self._pending.popleft()
            try:
                worker.tasks.send(task)
            except OSError:
                self._pending.appendleft(task)  # it died; its sentinel brings a new one
                return
            worker.outstanding.append(task)

    def _dispatch(self) -> None:
        while not self._closed:
            with self._lock:
                conns = {w.results: w for w in self._workers}
                sentinels = {w.process.sentinel: w for w in self._workers}
            ready = wait([*conns, *sentinels, self._wake_r], timeout=1.0)
            if self._closed:
                return
            for obj in ready:
                if obj is self._wake_r:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                elif obj in conns:
                    if not self._receive(conns[obj]):
                        self._replace(conns[obj])
                else:
                    self._replace(sentinels[obj])
            with self._lock:
                self._assign()

    def _receive(self, worker: _Worker) -> bool:
        """Take one result from a worker; False at end of file (the worker is gone)."""
        try:
            result = worker.results.recv()
        except (EOFError, OSError):
            return False  # the sentinel reports the death
        with self._lock:
            for i, task in enumerate(worker.outstanding):
                if task.id == result.task_id:
                    del worker.outstanding[i]
                    self._out.put(result)
                    break
        return True

    def _replace(self, worker: _Worker) -> None:
        """A worker died: drain what it finished, fail the file it was on, start another."""
        if worker not in self._workers:
            return
        while True:
            try:
                if not worker.results.poll():
                    break
            except (EOFError, OSError):
                break
            if not self._receive(worker):
                break
        worker.process.join(1.0)
        code = worker.process.exitcode
        with self._lock:
            if worker.outstanding:
                crashed = worker.outstanding.popleft()
                self._pending.extendleft(reversed(worker.outstanding))
                worker.outstanding.clear()
                self.crashes += 1
                log.error("decoder process died (exit code %s) on %s", code, crashed.path)
                self._out.put(
                    Failed(crashed.id, f"the decoder crashed on this file (exit code {code})")
                )
            for conn in (worker.tasks, worker.results):
                conn.close()
            if not self._closed:
                self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        """Stop the workers; tasks still queued are dropped (their jobs are released)."""
        if self._closed:
            return
        self._closed = True
        if self._inline is not None:
            self._inline = None
            return
        self._wake_w.send_bytes(b"!")
        self._thread.join(5.0)
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.tasks.send(None)
        for w in self._workers:
            w.process.join(2.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1.0)
            w.tasks.close()
            w.results.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
