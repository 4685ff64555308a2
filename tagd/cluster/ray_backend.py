"""The Ray side: connecting to a cluster and the tagging actor that runs on its nodes.

Only this module imports ray, and only `tagd.cluster` imports this module when `cluster:` is
configured. The actor decodes and infers with the local pipeline's own functions
(`workers.decode_and_prepare`, `pipeline.infer_tensors`), so a file gets the same scores
wherever it is tagged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray

import tagd
from tagd.config import Config, HydrusConfig

log = logging.getLogger(__name__)

__all__ = ["ModelPayload", "TagActor", "connect", "ray", "spawn"]


@dataclass(frozen=True)
class ModelPayload:
    """A model's files as the coordinator has them, for a worker that cannot fetch them."""

    model_file: str
    model_bytes: bytes
    label_file: str
    label_bytes: bytes
    revision: str


def connect(address: str, *, object_store_bytes: int | None = None) -> bool:
    """Join (or with `local`, start) the cluster; False when this process already had one."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address not in ("local", "auto"):
        reachable(address)
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
    if address == "local":
        kwargs["include_dashboard"] = False
        if object_store_bytes:
            kwargs["object_store_memory"] = object_store_bytes
        # Spelled out: a bare ray.init() joins whatever cluster `ray start` last recorded.
        ray.init(address="local", **kwargs)
    else:
        ray.init(address=address, **kwargs)
    # ray.init installs a C++ handler that dumps a stack trace on SIGTERM and aborts the
    # process at exit; tagd's own handlers (a clean `systemctl stop`) must stay in charge.
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)
    return True


def reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens there."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise ConnectionError(f"nothing answers at {hostport} ({exc})") from None


_MISMATCH = re.compile(
    r"The cluster was started with:\s*Ray: (\S+)\s*Python: (\S+)\s*"
    r"This process on .*? was started with:\s*Ray: (\S+)\s*Python: (\S+)",
    re.S,
)


def version_fix(error: str) -> str | None:
    """Ray's version-mismatch error (it prints both sides) as one line with the fix."""
    m = _MISMATCH.search(error)
    if m is None:
        return None
    ray_there, py_there, ray_here, py_here = m.groups()
    return (
        f"version mismatch: the cluster runs Ray {ray_there} on Python {py_there}, this machine "
        f"Ray {ray_here} on Python {py_here}; install ray=={ray_there} with Python "
        f"{'.'.join(py_there.split('.')[:2])} on every machine"
    )


def survey(address: str) -> dict[str, Any]:
    """Join the cluster (bounded like `connect`) and describe its live nodes, for `tagd check`.

    Returns {"nodes": [{"host", "cpus", "gpus"}], "ray", "python"}; raises ConnectionError
    with a one-line reason when it cannot join.
    """
    try:
        owned = connect(address)
    except ConnectionError:
        raise
    except Exception as exc:
        text = str(exc)
        fix = version_fix(text)
        if fix:
            raise ConnectionError(fix) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        raise ConnectionError(lines[-1] if lines else type(exc).__name__) from None
    try:
        nodes = [
            {
                "host": n.get("NodeManagerHostname") or n.get("NodeManagerAddress"),
                "cpus": float(n.get("Resources", {}).get("CPU", 0.0)),
                "gpus": float(n.get("Resources", {}).get("GPU", 0.0)),
            }
            for n in ray.nodes()
            if n.get("Alive")
        ]
    finally:
        if owned:
            ray.shutdown()
    return {
        "nodes": nodes,
        "ray": ray.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
    }


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))


class TagActor:
    """Loads each model once, then turns shipped files into scores and embeddings.

    `tag()` never raises for a bad file: each item comes back as a result or a failure, like
    the local decode workers' results. Anything else raising means this worker is broken.
    """

    def __init__(
        self, config: Config, threads: int, payloads: dict[str, ModelPayload] | None = None
    ) -> None:
        self.config = config
        self.threads = max(1, threads)
        self.taggers: list[Any] = []
        self.batch_size = 0
        self.load_error: str | None = None
        self.done = 0
        self.busy_s = 0.0
        self.started = time.time()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="tagd-actor-decode")
        # In the constructor, so a worker Ray restarts after a crash comes back with its models.
        self.loaded = self.load(payloads)

    def ready(self) -> dict[str, Any]:
        return {**self.loaded, **self.info()}

    def pid(self) -> int:
        return os.getpid()

    def load(self, payloads: dict[str, ModelPayload] | None = None) -> dict[str, Any]:
        """Open every enabled model; models missing here are listed for the coordinator to
        ship. Returns this worker's description, with `missing` and `error` when not ready."""
        from tagd.tagging import families, hub, sizing
        from tagd.tagging.tagger import Tagger

        payloads = payloads or {}
        missing: dict[str, str] = {}
        taggers = []
        self.load_error = None
        for model in (m for m in self.config.models if m.enabled):
            try:
                family = families.get(model.family, self.config.families)
            except KeyError as exc:
                self.load_error = f"model {model.name!r}: family: {exc.args[0]}"
                break
            try:
                if model.name in payloads:
                    files = self._unpack(model.name, payloads[model.name])
                else:
                    files = hub.resolve(
                        _mapped_model(model, self.config),
                        family,
                        cache_dir=self.config.hf_cache,
                        offline=self.config.offline,
                    )
            except hub.ModelError as exc:
                missing[model.name] = str(exc)
                continue
            try:
                taggers.append(
                    Tagger(model, family, files, self.config.inference, threads=self.threads)
                )
            except hub.ModelError as exc:
                self.load_error = str(exc)
                break
        if self.load_error is None and not missing:
            self.taggers = taggers
            gpu = any(t.on_gpu for t in taggers)
            self.batch_size = (
                self.config.inference.batch_size
                or sizing.plan(self.config.inference, gpu=gpu, cores=self.threads).batch_size
            )
        return {**self.info(), "missing": missing, "error": self.load_error}

    def _unpack(self, name: str, payload: ModelPayload) -> Any:
        """Write shipped files once into this node's cache, named by their content."""
        from tagd.tagging.hub import ModelFiles

        digest = hashlib.sha256(payload.model_bytes).hexdigest()[:16]
        base = Path(tempfile.gettempdir()) / "tagd-cluster-models" / f"{name}-{digest}"
        base.mkdir(parents=True, exist_ok=True)
        for fname, data in (
            (payload.model_file, payload.model_bytes),
            (payload.label_file, payload.label_bytes),
        ):
            target = base / fname
            if not target.is_file() or target.stat().st_size != len(data):
                tmp = target.with_suffix(target.suffix + f".{os.getpid()}.part")
                tmp.write_bytes(data)
                os.replace(tmp, target)
        return ModelFiles(base / payload.model_file, base / payload.label_file, payload.revision)

    def info(self) -> dict[str, Any]:
        """Who and where this worker is, for `tagd status` and the version check."""
        gpu_ids: list[str] = []
        try:
            gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        except Exception:  # outside a Ray worker (unit use)
            gpu_ids = []
        return {
            "host": socket.gethostname(),
            "node": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "tagd": tagd.__version__,
            "ray": ray.__version__,
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "provider": self.taggers[0].provider if self.taggers else None,
            "gpus": gpu_ids,
            "threads": self.threads,
            "batch": self.batch_size,
            "models": [t.name for t in self.taggers],
            "revisions": {t.name: t.files.revision for t in self.taggers},
            "done": self.done,
            "busy_s": round(self.busy_s, 3),
        }

    def tag(self, items: list[tuple[int, bytes | None, str | None, tuple[str, ...]]]) -> list[Any]:
        """Decode (from shipped bytes, or the mapped path) and infer one batch.

        Each item is (task id, file bytes or None, path on this node or None, model names).
        Returns per item ("ok", id, sha256, size, mtime_ns, width, height, format, outputs,
        media info or None) or ("failed", id, reason, transient, gone). Videos and animations
        are sampled as the local decoders do (`media.decode`) and their frames aggregated.
        """
        if not self.taggers:
            raise RuntimeError(self.load_error or "this tagd worker has no models loaded")
        start = time.perf_counter()
        decoded = list(self._pool.map(self._decode, items))
        ready = [d for d in decoded if d[0] == "ok"]
        from tagd.tagging.pipeline import infer_tensors

        scores = infer_tensors(
            self.taggers,
            [(d[1], d[8]) for d in ready],
            self.batch_size,
            aggregate=self.config.video.aggregate,
        )
        out: list[Any] = []
        for d in decoded:
            if d[0] != "ok":
                out.append(d)
                continue
            outputs = {name: scores[(d[1], name)] for name in d[8]}
            out.append((*d[:8], outputs, d[9]))
        self.done += len(ready)
        self.busy_s += time.perf_counter() - start
        return out

    def _decode(self, item: tuple[int, bytes | None, str | None, tuple[str, ...]]) -> tuple:
        from tagd.tagging import media
        from tagd.tagging.decode import DecodeError, read_file
        from tagd.tagging.workers import decode_and_prepare, draft_size

        task_id, data, path, models = item
        # A mapped video is hashed in chunks and decoded from its path, never read whole.
        by_path = data is None and path is not None and media.is_video_path(path)
        identity: tuple[str | None, int | None, int | None] = (None, None, None)
        if data is None:
            assert path is not None
            try:
                if by_path:
                    identity = media.hash_file(path)
                else:
                    file = read_file(path)
                    data = file.data
                    identity = (file.sha256, file.size, file.mtime_ns)
            except DecodeError as exc:
                return ("failed", task_id, exc.reason, exc.transient, exc.gone)
        specs = {t.name: t.spec for t in self.taggers if t.name in models}
        info: Any = None
        fmt: str | None
        try:
            source = path if by_path else data
            assert source is not None
            found = media.decode(
                source,
                specs,
                self.config.max_image_pixels,
                self.config.video,
                draft_size(list(specs.values())),
            )
            if found is not None:
                w, h, fmt, tensors, info = found
                if by_path and path and media.changed(path, identity[1] or 0, identity[2] or 0):
                    raise DecodeError("the file changed while it was read", transient=True)
            else:
                assert data is not None
                w, h, fmt, tensors = decode_and_prepare(data, specs, self.config.max_image_pixels)
        except DecodeError as exc:
            return ("failed", task_id, exc.reason, exc.transient, False)
        except (MemoryError, Exception) as exc:
            return ("failed", task_id, f"decoder error: {type(exc).__name__}: {exc}", False, False)
        return ("ok", task_id, *identity, w, h, fmt, tensors, info)


def _mapped_model(model: Any, config: Config) -> Any:
    """A model folder given as a coordinator path is read through `path_map` on workers."""
    if model.path is None or config.cluster is None:
        return model
    mapped = map_path(str(model.path), config.cluster.path_map)
    return replace(model, path=Path(mapped)) if mapped else model


def map_path(path: str, path_map: tuple[tuple[str, str], ...]) -> str | None:
    for src, dst in path_map:
        if path == src or path.startswith(src.rstrip("/") + "/"):
            return dst + path[len(src) :]
    return None


def spawn(
    config: Config,
    *,
    num_cpus: float,
    num_gpus: float,
    payloads: dict[str, ModelPayload] | None = None,
) -> Any:
    """Start one tagging actor; Ray restarts it (models reloaded) if its process dies."""
    cls = ray.remote(TagActor)
    options: dict[str, Any] = {
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_restarts": -1,
        "max_task_retries": 0,
        "max_concurrency": 1,
    }
    threads = max(1, int(num_cpus)) if num_cpus >= 1 else 1
    # Workers get the models and their settings, never secrets such as the Hydrus key.
    private = replace(config, hydrus=HydrusConfig())
    return cls.options(**options).remote(private, threads, payloads)


def payload_for(files: Any) -> ModelPayload:
    """Read a model's files on the coordinator, to ship them to a worker that lacks them."""
    return ModelPayload(
        model_file=files.model_path.name,
        model_bytes=files.model_path.read_bytes(),
        label_file=files.label_path.name,
        label_bytes=files.label_path.read_bytes(),
        revision=files.revision,
    )


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
