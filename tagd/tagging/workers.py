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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np
from PIL import Image

from tagd.config import VideoSettings
from tagd.index import db, scores
from tagd.names import for_humans
from tagd.tagging import media
from tagd.tagging.decode import DecodeError, FileBytes, open_image, read_file
from tagd.tagging.media import MediaInfo
from tagd.tagging.preprocess import PreprocessSpec, compact, prepare

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
    incomplete: bool = False


Result = Decoded | Failed


@dataclass(frozen=True)
class Setup:
    """What every worker needs; picklable. `database` (read-only) answers "already tagged?"."""

    specs: dict[str, PreprocessSpec]
    model_ids: dict[str, int]
    max_pixels: int
    database: str | None = None
    # Bytes one decode may use (header estimate); files larger than max_file_bytes are not read.
    memory_budget: int | None = None
    max_file_bytes: int | None = None
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
    data: bytes,
    specs: dict[str, PreprocessSpec],
    max_pixels: int,
    *,
    draft: bool = True,
    budget: int | None = None,
) -> tuple[int, int, str | None, dict[str, np.ndarray]]:
    """Decode once, preprocess for every model in `specs`. Raises DecodeError.

    With `draft`, an image much larger than the inputs is scaled down early (JPEG: by the DCT
    while decoding; others: box reduction), staying >= every input on both axes; the
    reported width/height are still those of the full image. `budget` refuses an image whose
    decode would need more bytes (DecodeError naming inference.worker_memory_mb).
    """
    target = draft_size(list(specs.values())) if draft and specs else None
    image = open_image(data, max_pixels=max_pixels, draft=target, budget=budget)
    try:
        full = image.info.get("full_size", image.size)
        fmt = image.format
        small = shrink(image, target) if target else image
        tensors = {name: compact(prepare(small, spec), spec) for name, spec in specs.items()}
    finally:
        image.close()
    return full[0], full[1], fmt, tensors


class Decoder:
    """One worker's state: turns a Task into a Result, never raises for a bad file."""

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self._conn: sqlite3.Connection | None = None

    def done_models(self, sha256: str) -> set[str]:
        if self.setup.database is None:
            return set()
        if self._conn is None:
            self._conn = db.connect_bare_readonly(self.setup.database)
        ids = scores.model_ids_for_sha(self._conn, sha256)
        return {name for name, mid in self.setup.model_ids.items() if mid in ids}

    def __call__(self, task: Task) -> Result:
        by_path = media.is_video_path(task.path)
        try:
            # Videos are hashed in chunks and decoded from the path, never read whole.
            file = (
                FileBytes(b"", *media.hash_file(task.path))
                if by_path
                else read_file(task.path, max_bytes=self.setup.max_file_bytes)
            )
        except DecodeError as exc:
            return Failed(task.id, exc.reason, exc.transient, exc.gone, exc.incomplete)
        except MemoryError:
            return Failed(task.id, out_of_memory(self.setup.memory_budget))
        try:
            done = self.done_models(file.sha256)
        except sqlite3.Error as exc:
            log.warning("cannot check earlier results for %s: %s", for_humans(task.path), exc)
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
                w, h, fmt, tensors = decode_and_prepare(
                    file.data, specs, self.setup.max_pixels, budget=self.setup.memory_budget
                )
        except DecodeError as exc:
            return Failed(task.id, exc.reason, exc.transient, incomplete=exc.incomplete)
        except MemoryError:
            del file
            return Failed(task.id, out_of_memory(self.setup.memory_budget))
        except Exception as exc:
            # A decoder bug on one hostile file must not take the batch down with it.
            log.exception("unexpected error decoding %s", for_humans(task.path))
            return Failed(task.id, f"decoder error: {type(exc).__name__}: {exc}")
        result.width, result.height, result.format, result.tensors = w, h, fmt, tensors
        return result


def out_of_memory(budget: int | None) -> str:
    if budget is None:
        return "out of memory while decoding this file"
    return (
        f"decoding this file needs more than the decode worker's memory budget of "
        f"{budget >> 20} MiB (inference.worker_memory_mb)"
    )


PR_SET_PDEATHSIG = 1
# First message of a worker: started and set up, so decode time is counted from here on
# (a slow process start on a busy machine is no file's fault).
READY = "ready"


def _die_with_parent() -> None:
    """A worker stuck in a codec never polls its pipe: have the kernel kill it when its
    parent (the forkserver, which exits with tagd) goes, even if tagd was SIGKILLed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def _let_forkserver_go() -> None:
    """A forkserver child inherits the write end of the pipe on which the forkserver waits
    for tagd's death. A worker stuck in a codec would hold it open, so after a SIGKILL of
    tagd the forkserver (and with it the worker: PDEATHSIG) would live on. Workers start no
    processes of their own, so they close it."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(fd, int):
        with contextlib.suppress(OSError):
            os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]


def _data_in_use() -> int:
    """This process's data segment (VmData: heap and private anonymous mappings) in bytes."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# Room above the budget for the worker's own bookkeeping (pickling results, the DB check).
RLIMIT_SLACK = 64 << 20


def limit_memory(budget: int) -> None:
    """Backstop for the header estimate: allocations past what the worker holds already plus
    `budget` fail with MemoryError (RLIMIT_DATA counts heap and anonymous mmap, not the
    shared libraries), so one file cannot take the box down."""
    import resource

    limit = _data_in_use() + budget + RLIMIT_SLACK
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _worker_main(
    factory: Callable[[], Callable[[Task], Result]],
    tasks: Connection,
    results: Connection,
    memory_limit: int | None = None,
) -> None:
    """Worker loop: leaves when the parent closes the pipe, sends None, or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:
        return
    _let_forkserver_go()
    handle = factory()
    if memory_limit is not None:
        limit_memory(memory_limit)
    results.send(READY)
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


def _context() -> Any:
    if sys.platform.startswith("linux"):
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tagd.tagging.workers"])
        return ctx
    return mp.get_context("spawn")


def prestart() -> int | None:
    """Start the forkserver now; returns its pid (None where workers are spawned).

    The first worker cannot start before the forkserver has started Python and imported
    this module (about half a second), and tagd waits for that. Called before a model
    loads, that start runs on the core the session load leaves idle."""
    if not sys.platform.startswith("linux"):
        return None
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()
    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    tasks: Connection
    results: Connection
    outstanding: collections.deque[Task] = field(default_factory=collections.deque)
    # monotonic time the task at the head of `outstanding` reached the worker's hands
    started: float = 0.0
    # why the parent killed it (a timeout), for the failure of the file it was on
    killed_for: str | None = None
    ready: bool = False


class DecodePool:
    """`submit(task)` never blocks and `get()` returns results in completion order.

    Callers bound the number of tasks in flight; the pool keeps each worker `depth` deep.
    With `workers == 0` tasks are handled in the calling thread, inside `get()`.

    `timeout`: a worker still on one file after this many seconds is killed and the file
    fails. `memory_limit`: each worker's RLIMIT_DATA headroom in bytes. `on_suspect(task id,
    True)` is called once a file has been decoding for `suspect_after` seconds (in the calling
    thread before each file when inline), and `(task id, False)` when it came back normally:
    tagd records it, so that if the whole process dies, only that file is charged an attempt.
    """

    def __init__(
        self,
        factory: Callable[[], Callable[[Task], Result]],
        workers: int,
        *,
        depth: int = DEPTH,
        timeout: float | None = None,
        memory_limit: int | None = None,
        on_suspect: Callable[[int, bool], None] | None = None,
        suspect_after: float = 2.0,
    ) -> None:
        self.factory = factory
        self.size = workers
        self.depth = depth
        self.timeout = timeout
        self.memory_limit = memory_limit
        self.on_suspect = on_suspect
        self.suspect_after = suspect_after
        self._suspects: set[int] = set()
        self.crashes = 0
        self.timeouts = 0
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
            args=(self.factory, task_r, result_w, self.memory_limit),
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

    def grow(self, workers: int) -> None:
        """Start more workers (a backlog appeared); tasks already handed out stay where they are."""
        if self._inline is not None or workers <= self.size or self._closed:
            return
        with self._lock:
            self._workers.extend(self._spawn() for _ in range(workers - self.size))
            self.size = workers
            self._assign()
        self._wake_w.send_bytes(b"!")

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
            return self._handle_inline() if self._pending else None
        try:
            return self._out.get(timeout=timeout)
        except stdqueue.Empty:
            return None

    def _handle_inline(self) -> Result:
        assert self._inline is not None
        task = self._pending.popleft()
        if self.on_suspect is not None:
            self.on_suspect(task.id, True)
        result = self._inline(task)
        if self.on_suspect is not None:
            self.on_suspect(task.id, False)
        return result

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
            if not worker.outstanding:
                worker.started = time.monotonic()
            worker.outstanding.append(task)

    def _dispatch(self) -> None:
        while not self._closed:
            with self._lock:
                conns = {w.results: w for w in self._workers}
                sentinels = {w.process.sentinel: w for w in self._workers}
            ready: list[Any] = wait([*conns, *sentinels, self._wake_r], timeout=1.0)
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
            self._watch()

    def _watch(self) -> None:
        """Kill workers stuck on one file past the timeout; report slow files as suspects."""
        now = time.monotonic()
        suspects: list[int] = []
        with self._lock:
            for w in self._workers:
                if not w.ready or not w.outstanding or w.killed_for is not None:
                    continue
                age = now - w.started
                head = w.outstanding[0]
                if self.timeout is not None and age > self.timeout:
                    w.killed_for = (
                        f"reading and decoding this file took longer than {self.timeout:g} s "
                        "(inference.decode_timeout); its worker was stopped"
                    )
                    log.error("decoder stuck for %.0f s on %s; stopping it", age, head.path)
                    w.process.kill()
                elif age > self.suspect_after and head.id not in self._suspects:
                    self._suspects.add(head.id)
                    suspects.append(head.id)
        if self.on_suspect is not None:
            for task_id in suspects:
                self._report(task_id, True)

    def _report(self, task_id: int, decoding: bool) -> None:
        assert self.on_suspect is not None
        try:
            self.on_suspect(task_id, decoding)
        except Exception as exc:
            log.warning("cannot record the decode of job %d: %s", task_id, exc)

    def _receive(self, worker: _Worker) -> bool:
        """Take one result from a worker; False at end of file (the worker is gone)."""
        try:
            result = worker.results.recv()
        except (EOFError, OSError):
            return False  # the sentinel reports the death
        if isinstance(result, str) and result == READY:
            with self._lock:
                worker.ready = True
                worker.started = time.monotonic()
            return True
        cleared = False
        with self._lock:
            for i, task in enumerate(worker.outstanding):
                if task.id == result.task_id:
                    del worker.outstanding[i]
                    worker.started = time.monotonic()
                    self._out.put(result)
                    break
            if result.task_id in self._suspects:
                self._suspects.discard(result.task_id)
                cleared = True
        if cleared and self.on_suspect is not None:
            self._report(result.task_id, False)
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
                self._suspects.discard(crashed.id)
                if worker.killed_for is not None:
                    self.timeouts += 1
                    reason = worker.killed_for
                else:
                    self.crashes += 1
                    log.error("decoder process died (exit code %s) on %s", code, crashed.path)
                    reason = f"the decoder crashed on this file (exit code {code})"
                self._out.put(Failed(crashed.id, reason))
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
