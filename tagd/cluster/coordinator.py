"""The coordinator: the local pipeline's queue and store, with decode + infer on Ray actors.

This process stays the only writer of SQLite and the owner of the durable queue. It claims
jobs as the local pipeline does, reads each file once (hash: skip content already tagged),
ships the compressed bytes (or, under `cluster.path_map`, only the path) to the least busy
actor, and stores what comes back through the same store thread and `Pipeline.store`. A batch
lost with its actor (a killed process, a node that left) is shipped again; a file lost
`MAX_LOSSES` times is recorded failed. Jobs stay leased to this process the whole time
(heartbeats), so a coordinator killed mid-run leaves leases that the next run takes back.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import tagd
from tagd.cluster import STATE_KEY, ClusterError
from tagd.cluster import ray_backend as rb
from tagd.config import Config
from tagd.index import db
from tagd.index import jobs as queue
from tagd.tagging.decode import DecodeError, FileBytes, read_file
from tagd.tagging.pipeline import Outcome, Pipeline, Prepared, _Batch, _Item, _StoreThread
from tagd.tagging.tagger import Tagger
from tagd.tagging.workers import Failed

log = logging.getLogger(__name__)

MAX_LOSSES = 3
READY_TIMEOUT_S = 180.0
LOCAL_OBJECT_STORE = 256 * 1024 * 1024
_NO_TENSOR = np.empty(0, dtype=np.float32)


@dataclass
class _Actor:
    handle: Any
    info: dict[str, Any]
    batch: int
    outstanding: int = 0
    done: int = 0
    deaths: int = 0
    lost_in_row: int = 0
    first_ship: float | None = None
    state: str = "ready"
    probe: Any = None
    charged: int = -1


@dataclass
class _Shipment:
    """A claimed job on its way to the cluster: its bytes (None when mapped) and models."""

    job: queue.Job
    file: FileBytes | None
    path: str | None
    models: tuple[str, ...]


@dataclass
class _Flight:
    actor: _Actor
    items: list[_Shipment]
    seq: int = 0
    sent: float = field(default_factory=time.monotonic)


class ClusterPipeline(Pipeline):
    """`Pipeline.run()` / `process()` with the decode and model stages on the cluster."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: Config,
        taggers: Sequence[Tagger],
        *,
        owner: str | None = None,
        actors: Sequence[Any] | None = None,
    ) -> None:
        super().__init__(conn, config, taggers, owner=owner)
        assert config.cluster is not None
        self.cluster = config.cluster
        self._given = list(actors) if actors is not None else None
        self.actors: list[_Actor] = []
        self.deaths = 0
        self.resubmitted = 0
        self.bytes_shipped = 0
        self.files_shipped = 0
        self._started = False
        self._published = 0.0
        self._spawn_args: dict[str, float] = {}
        self._owns_ray = False
        self._connected = False
        # Here rather than in run(): the daemon runs the pipeline in a thread, and only the
        # main thread can put tagd's signal handlers back after ray.init.
        self._connect()

    # -- cluster lifetime -------------------------------------------------------------------

    def start(self) -> None:
        """Connect, start the actors and wait until they have loaded the models."""
        if self._started:
            return
        self._connect()
        handles = self._given if self._given is not None else self._spawn_all()
        self.actors = self._await_ready(handles)
        self._started = True
        self.reap_orphans()
        self.publish(force=True)

    def _connect(self) -> None:
        if self._connected:
            return
        c = self.cluster
        try:
            self._owns_ray = rb.connect(c.address, object_store_bytes=LOCAL_OBJECT_STORE)
        except Exception as exc:
            raise ClusterError(
                f"cluster.address {c.address}: cannot join the Ray cluster ({_first_line(exc)}); "
                "start it with `ray start --head` or use address: local"
            ) from None
        self._connected = True
        if self._owns_ray and c.address != "local":
            _watch_for_abrupt_exit(c.address)

    def _spawn_all(self) -> list[Any]:
        c = self.cluster
        gpus, cpus = rb.cluster_gpus(), rb.cluster_cpus()
        num_gpus = c.num_gpus if c.num_gpus is not None else (1.0 if gpus else 0.0)
        if c.actors is not None:
            count = c.actors
        elif num_gpus:
            count = max(1, int(gpus // num_gpus))
        else:
            count = max(1, int(cpus // (c.num_cpus or 1.0)))
        num_cpus = c.num_cpus
        if num_cpus is None:
            num_cpus = max(1.0, float(int(cpus // count))) if num_gpus else 1.0
        log.info(
            "cluster: %.0f CPUs, %.0f GPUs; starting %d workers with %g CPUs and %g GPUs each",
            cpus,
            gpus,
            count,
            num_cpus,
            num_gpus,
        )
        self._spawn_args = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        return [rb.spawn(self.config, num_cpus=num_cpus, num_gpus=num_gpus) for _ in range(count)]

    def _await_ready(self, handles: list[Any]) -> list[_Actor]:
        """Keep the workers that loaded every model; ship model files to those lacking them."""
        ready: list[_Actor] = []
        errors: list[str] = []
        pending = {h.ready.remote(): h for h in handles}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while pending:
            done, _ = rb.ray.wait(
                list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            if not done:
                raise ClusterError(
                    f"no tagd worker started within {READY_TIMEOUT_S:.0f} s: the cluster has "
                    f"{rb.cluster_cpus():.0f} CPUs and {rb.cluster_gpus():.0f} GPUs free for "
                    "workers; lower cluster.num_gpus / num_cpus or add a node"
                )
            ref = done[0]
            handle = pending.pop(ref)
            try:
                info = rb.ray.get(ref)
            except Exception as exc:
                errors.append(f"a worker failed to start: {_first_line(exc)}")
                rb.ray.kill(handle)
                continue
            problem = self._problem(info)
            if info.get("missing") and not info.get("error") and not problem:
                if self.cluster.ship_models and self._given is None:
                    log.info(
                        "worker on %s cannot fetch %s; sending the model files",
                        info["host"],
                        ", ".join(info["missing"]),
                    )
                    rb.ray.kill(handle)
                    new = rb.spawn(
                        self.config,
                        num_cpus=self._spawn_args["num_cpus"],
                        num_gpus=self._spawn_args["num_gpus"],
                        payloads=self._payloads(info["missing"]),
                    )
                    pending[new.ready.remote()] = new
                    continue
                problem = "; ".join(info["missing"].values())
            problem = problem or info.get("error")
            if problem:
                where = f"worker {info['host']} (pid {info['pid']})"
                log.error("cluster: %s cannot tag: %s", where, problem)
                errors.append(f"{where}: {problem}")
                rb.ray.kill(handle)
                continue
            log.info(
                "cluster worker on %s (pid %s) ready: %s, batch %d",
                info["host"],
                info["pid"],
                info["provider"],
                info["batch"],
            )
            ready.append(_Actor(handle, info, max(1, int(info["batch"]))))
        if not ready:
            raise ClusterError(
                "no cluster worker could load the models: " + ("; ".join(errors) or "none started")
            )
        if errors:
            with db.write(self.conn):
                db.set_state(self.conn, "last_error", "cluster: " + errors[0])
        return ready

    def _problem(self, info: dict[str, Any]) -> str | None:
        """Version and model revision checks: a mismatched worker would store other results."""
        if info.get("tagd") != tagd.__version__:
            return (
                f"it runs tagd {info.get('tagd')} and the coordinator {tagd.__version__}; "
                f"install the same version there (pip install 'tagd[ray]=={tagd.__version__}')"
            )
        mine = {t.name: t.files.revision for t in self.taggers}
        for name, rev in (info.get("revisions") or {}).items():
            if name in mine and rev != mine[name]:
                return (
                    f"model {name!r} is at revision {rev} there and {mine[name]} here; pin "
                    "`revision:` to a commit so every machine loads the same weights"
                )
        return None

    def _payloads(self, names: Sequence[str]) -> dict[str, rb.ModelPayload]:
        by_name = {t.name: t for t in self.taggers}
        return {n: rb.payload_for(by_name[n].files) for n in names if n in by_name}

    def close(self) -> None:
        if self._started:
            if self._given is None:
                for a in self.actors:
                    try:
                        rb.ray.kill(a.handle)
                    except Exception as exc:
                        log.debug("killing a worker: %s", exc)
            self.publish(force=True, stopped=True)
            self._started = False
        if self._owns_ray:
            rb.shutdown()
            self._owns_ray = self._connected = False
        super().close()

    # -- status -----------------------------------------------------------------------------

    def workers(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for a in self.actors:
            elapsed = now - a.first_ship if a.first_ship else 0.0
            out.append(
                {
                    "host": a.info.get("host"),
                    "node": a.info.get("node"),
                    "pid": a.info.get("pid"),
                    "device": a.info.get("provider"),
                    "gpus": a.info.get("gpus"),
                    "state": a.state,
                    "done": a.done,
                    "rate": round(a.done / elapsed, 2) if elapsed > 0 else 0.0,
                    "deaths": a.deaths,
                }
            )
        return out

    def publish(self, *, force: bool = False, stopped: bool = False) -> None:
        """The workers table `tagd status` prints, refreshed every few seconds."""
        now = time.monotonic()
        if not force and now - self._published < 5.0:
            return
        self._published = now
        value = json.dumps(
            {
                "address": self.cluster.address,
                "coordinator": self.owner,
                "updated": time.time(),
                "stopped": stopped,
                "workers": self.workers(),
                "worker_deaths": self.deaths,
                "files_shipped": self.files_shipped,
                "bytes_shipped": self.bytes_shipped,
            }
        )
        try:
            with db.write(self.conn):
                db.set_state(self.conn, STATE_KEY, value)
        except sqlite3.Error as exc:
            log.debug("cluster status not written: %s", exc)

    # -- the run ------------------------------------------------------------------------------

    def _drive(self, take: Callable[[int], list[queue.Job]], stop: Callable[[], bool]) -> Outcome:
        self.start()
        outcome = Outcome()
        names = tuple(t.name for t in self.taggers)
        writer = _StoreThread(self, self.database, outcome) if self.database else None
        if writer:
            writer.start()
            write: Callable[[_Item], None] = writer.put
        else:
            write = functools.partial(self._write, self.conn, outcome=outcome)
        batch = max(a.batch for a in self.actors)
        flight_limit = self.cluster.max_in_flight or 2 * len(self.actors)
        claim_limit = (flight_limit + 1) * batch
        claimed: dict[int, queue.Job] = {}
        pending: collections.deque[_Shipment] = collections.deque()
        retry: collections.deque[list[_Shipment]] = collections.deque()
        flights: dict[Any, _Flight] = {}
        losses: dict[int, int] = collections.defaultdict(int)
        seq = itertools.count()
        exhausted = False
        lease = self.config.daemon.lease_seconds
        beat = time.monotonic()

        def finish(job: queue.Job) -> None:
            claimed.pop(job.id, None)

        def read(job: queue.Job) -> _Shipment | None:
            mapped = rb.map_path(job.path, self.cluster.path_map)
            if mapped is not None:
                return _Shipment(job, None, mapped, names)
            try:
                file = read_file(job.path)
            except DecodeError as exc:
                finish(job)
                write((job, Failed(job.id, exc.reason, exc.transient, exc.gone)))
                return None
            todo = tuple(t.name for t in self.needed(job, file.sha256))
            if not todo:
                finish(job)
                write(_Batch([], {}, [(job, _no_data(file))]))
                return None
            return _Shipment(job, file, None, todo)

        def ship(items: list[_Shipment]) -> bool:
            live = [a for a in self.actors if a.state == "ready"]
            if not live:
                if all(a.state == "failed" for a in self.actors):
                    raise ClusterError("every cluster worker is gone; tagging stopped")
                return False
            actor = min(live, key=lambda a: a.outstanding / a.batch)
            payload = [(i.job.id, i.file.data if i.file else None, i.path, i.models) for i in items]
            ref = actor.handle.tag.remote(payload)
            actor.outstanding += 1
            actor.first_ship = actor.first_ship or time.monotonic()
            flights[ref] = _Flight(actor, items, next(seq))
            self.files_shipped += len(items)
            self.bytes_shipped += sum(len(i.file.data) for i in items if i.file)
            return True

        try:
            while True:
                if time.monotonic() - beat > lease / 3:
                    queue.heartbeat(self.conn, self.owner, lease)
                    beat = time.monotonic()
                self.publish()
                if not exhausted and stop():
                    exhausted = True
                    self._release(list(claimed.values()))
                    claimed.clear()
                    pending.clear()
                    retry.clear()
                    flights.clear()
                    break
                progressed = True
                while progressed:
                    progressed = False
                    while len(flights) < flight_limit and (
                        retry or len(pending) >= batch or (pending and exhausted)
                    ):
                        if retry:
                            if not ship(retry[0]):
                                break
                            retry.popleft()
                            self.resubmitted += 1
                        else:
                            chunk = [pending[i] for i in range(min(batch, len(pending)))]
                            if not ship(chunk):
                                break
                            for _ in chunk:
                                pending.popleft()
                    if not exhausted and len(claimed) + batch <= claim_limit:
                        jobs = take(batch)
                        exhausted = not jobs
                        progressed = bool(jobs)
                        for job in jobs:
                            claimed[job.id] = job
                            item = read(job)
                            if item is not None:
                                pending.append(item)
                if exhausted and not flights and not pending and not retry:
                    break
                self._check_probes()
                if not flights:
                    probes = [a.probe for a in self.actors if a.probe is not None]
                    if probes:
                        rb.ray.wait(probes, num_returns=1, timeout=0.5)
                    continue
                done, _ = rb.ray.wait(list(flights), num_returns=1, timeout=0.5)
                for ref in done:
                    flight = flights.pop(ref)
                    flight.actor.outstanding -= 1
                    try:
                        answer = rb.ray.get(ref)
                    except rb.ray.exceptions.RayTaskError as exc:
                        self._broken(flight.actor, _first_line(exc.cause or exc))
                        self._lost(flight, losses, retry, write, finish)
                    except rb.ray.exceptions.RayError as exc:
                        self._died(flight, exc, flights)
                        self._lost(flight, losses, retry, write, finish)
                    else:
                        flight.actor.lost_in_row = 0
                        self._accept(flight, answer, write, finish)
        except BaseException as exc:
            self._release(list(claimed.values()))
            if writer:
                writer.finish(raising=False)
            queue.release(self.conn, self.owner)
            if isinstance(exc, rb.ray.exceptions.RayError):
                # Not a worker's answer (those are handled above): the cluster itself is gone.
                raise ClusterError(
                    f"cluster.address {self.cluster.address}: the Ray cluster stopped answering "
                    f"mid-run ({_first_line(exc)}); the claimed jobs are queued again, run "
                    "again once the head is back"
                ) from None
            raise
        if writer:
            writer.finish(raising=True)
        self.publish(force=True)
        return outcome

    def _accept(
        self,
        flight: _Flight,
        answer: list[Any],
        write: Callable[[_Item], None],
        finish: Callable[[queue.Job], None],
    ) -> None:
        """Turn an actor's answer into the store's batch: results, unchanged files, failures."""
        by_id = {i.job.id: i for i in flight.items}
        prepared: list[Prepared] = []
        scores: dict[tuple[int, str], tuple[np.ndarray, np.ndarray | None]] = {}
        unchanged: list[tuple[queue.Job, FileBytes]] = []
        for res in answer:
            item = by_id[res[1]]
            finish(item.job)
            if res[0] == "failed":
                _, _, reason, transient, gone = res
                write((item.job, Failed(item.job.id, reason, transient, gone)))
                continue
            _, _, sha, size, mtime_ns, width, height, fmt, outputs, info = res
            file = _no_data(item.file) if item.file else FileBytes(b"", sha, size, mtime_ns)
            if item.file is None:
                keep = {t.name for t in self.needed(item.job, file.sha256)}
                outputs = {k: v for k, v in outputs.items() if k in keep}
            if not outputs:
                unchanged.append((item.job, file))
                continue
            tensors = dict.fromkeys(outputs, _NO_TENSOR)
            prepared.append(Prepared(item.job, file, width, height, fmt, tensors, info))
            for name, value in outputs.items():
                scores[(item.job.id, name)] = value
        flight.actor.done += len(prepared) + len(unchanged)
        if prepared or unchanged:
            write(_Batch(prepared, scores, unchanged))

    def _died(self, flight: _Flight, exc: BaseException, flights: dict[Any, _Flight]) -> None:
        """The worker process is gone (Ray restarts it). Its batches come back as errors;
        only the oldest, the one it was running, counts against its files (`_lost`)."""
        actor = flight.actor
        if actor.state == "ready":
            self.deaths += 1
            actor.deaths += 1
            actor.lost_in_row += 1
            mine = [f.seq for f in flights.values() if f.actor is actor]
            actor.charged = min([flight.seq, *mine])
            log.error(
                "cluster worker on %s (pid %s) died (%s); its files go to a worker again",
                actor.info.get("host"),
                actor.info.get("pid"),
                type(exc).__name__,
            )
            if actor.lost_in_row >= 5:
                self._broken(actor, f"died {actor.lost_in_row} times without finishing a batch")
            else:
                actor.state = "restarting"
                actor.probe = actor.handle.ready.remote()

    def _check_probes(self) -> None:
        """A restarted worker takes work again once it has loaded its models."""
        for actor in self.actors:
            if actor.probe is None:
                continue
            done, _ = rb.ray.wait([actor.probe], num_returns=1, timeout=0)
            if not done:
                continue
            try:
                info = rb.ray.get(done[0])
            except rb.ray.exceptions.RayActorError:
                actor.probe = actor.handle.ready.remote()
                continue
            except rb.ray.exceptions.RayError as exc:
                actor.probe = None
                self._broken(actor, _first_line(exc))
                continue
            actor.probe = None
            if info.get("error") or info.get("missing"):
                self._broken(actor, info.get("error") or "; ".join(info["missing"].values()))
                continue
            actor.info = info
            actor.state = "ready"
            log.info("cluster worker on %s is back (pid %s)", info["host"], info["pid"])

    def _broken(self, actor: _Actor, reason: str) -> None:
        if actor.state == "failed":
            return
        actor.state = "failed"
        line = f"cluster worker on {actor.info.get('host')} (pid {actor.info.get('pid')}): {reason}"
        log.error("%s; it gets no more work", line)
        try:
            with db.write(self.conn):
                db.set_state(self.conn, "last_error", line)
        except sqlite3.Error:
            pass

    def _lost(
        self,
        flight: _Flight,
        losses: dict[int, int],
        retry: collections.deque[list[_Shipment]],
        write: Callable[[_Item], None],
        finish: Callable[[queue.Job], None],
    ) -> None:
        """Ship a lost batch again; after a second loss file by file, to find the culprit."""
        again: list[_Shipment] = []
        charged = flight.seq == flight.actor.charged or flight.actor.state == "failed"
        for item in flight.items:
            losses[item.job.id] += int(charged)
            if losses[item.job.id] >= MAX_LOSSES:
                finish(item.job)
                reason = f"the cluster worker stopped {MAX_LOSSES} times while tagging this file"
                write((item.job, Failed(item.job.id, reason)))
            else:
                again.append(item)
        if any(losses[i.job.id] >= 2 for i in again):
            retry.extend([i] for i in again)
        elif again:
            retry.append(again)


def _no_data(file: FileBytes) -> FileBytes:
    return FileBytes(b"", file.sha256, file.size, file.mtime_ns)


_WATCHER = (
    "import sys\nif sys.stdin.buffer.read() != b'ok':\n    sys.stderr.write(sys.argv[1] + '\\n')\n"
)


def _watch_for_abrupt_exit(address: str) -> None:
    """Ray's core worker ends this process itself (`_exit(1)`, no Python code runs, its reason
    only in the session's driver log) when the head node's raylet dies under it. A tiny child
    that holds the other end of a pipe prints tagd's one line when that happens; a normal exit
    tells it all is well (atexit), so it stays silent."""
    message = (
        f"tagd: cluster.address {address}: the Ray cluster went away mid-run (the head stopped "
        "or restarted) and Ray ended the coordinator; its jobs are queued again by the next "
        "`tagd scan` or `tagd run` once the head is back"
    )
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", _WATCHER, message],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.debug("no exit watcher: %s", exc)
        return
    pipe = child.stdin
    assert pipe is not None

    def clean_exit() -> None:
        try:
            pipe.write(b"ok")
            pipe.close()
            child.wait(5)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.debug("exit watcher: %s", exc)

    atexit.register(clean_exit)
    os.set_inheritable(pipe.fileno(), False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
