"""`tagd check`: every precondition of a working setup, each with its fix.

Each check is real, not a guess: models are loaded into an ONNX Runtime session (which
also compares the label file with the graph), the database directory is written to, the
provider reported is the one a session actually got.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tagd.config import Config, InferenceConfig, ModelConfig

if TYPE_CHECKING:
    from tagd.ingest.scanner import Skipped

MIN_FREE_BYTES = 1 << 30
INOTIFY_MAX = Path("/proc/sys/fs/inotify/max_user_watches")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        fix = f" -> {self.fix}" if not self.ok and self.fix else ""
        return f"{mark} {self.name}: {self.detail}{fix}"


def probe_provider(inference: InferenceConfig) -> str:
    """The provider a real session gets with this config (a one-node graph, no weights)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from tagd.tagging.session import nvidia_present, providers_for, session_options

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    providers = providers_for(
        inference, ort.get_available_providers(), gpu_present=nvidia_present()
    )
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=session_options(1),
        providers=providers,
    )
    return str(session.get_providers()[0])


def count_images(config: Config, index: int, skipped: Skipped | None = None) -> tuple[int, int]:
    """(images tagd would index, folders) under one root, walking as the scanner does;
    `skipped` collects files left out by extension and folders that cannot be listed."""
    from tagd.ingest.filters import excluded
    from tagd.ingest.scanner import walk

    root = config.watch[index]
    images = sum(1 for _ in walk(root, config.extensions, skipped=skipped))
    folders = 1
    for dirpath, dirnames, _ in os.walk(root.path):
        keep = []
        for d in dirnames:
            rel = os.path.relpath(os.path.join(dirpath, d), root.path).replace(os.sep, "/")
            if not excluded(rel, root.exclude):
                keep.append(d)
        dirnames[:] = keep
        folders += len(keep)
    return images, folders


def check_roots(config: Config) -> Iterator[Check]:
    if not config.watch:
        yield Check("watch", False, "no roots configured", "add a folder under `watch:`")
    for i, root in enumerate(config.watch):
        name = f"watch[{i}] {root.path}"
        if not root.path.is_dir():
            yield Check(name, False, "does not exist", "create it, mount it or fix the path")
            continue
        if not os.access(root.path, os.R_OK | os.X_OK):
            yield Check(name, False, "not readable", f"grant read access to {os.getuid()}")
            continue
        from tagd.ingest.scanner import Skipped

        skipped = Skipped()
        images, _ = count_images(config, i, skipped)
        plural = "image" if images == 1 else "images"
        left_out = sum(skipped.by_extension.values())
        detail = f"readable, {images} {plural}"
        if left_out:
            kinds = ", ".join(
                f"{ext} {n}"
                for ext, n in sorted(skipped.by_extension.items(), key=lambda kv: -kv[1])[:5]
            )
            detail += f"; {left_out} other file{'' if left_out == 1 else 's'} skipped ({kinds})"
        if skipped.unlistable:
            yield Check(
                name,
                False,
                f"{detail}; {skipped.unlistable} folder(s) cannot be listed "
                f"(e.g. {skipped.examples[0]})",
                f"grant user {os.getuid()} read and execute access to them",
            )
            continue
        yield Check(name, True, detail)


def check_inotify(config: Config) -> Check:
    needed = 0
    for i, root in enumerate(config.watch):
        if not root.polling and root.path.is_dir():
            needed += count_images(config, i)[1]
    try:
        limit = int(INOTIFY_MAX.read_text().strip())
    except (OSError, ValueError):
        return Check("inotify", True, f"{needed} watches needed (limit unknown on this system)")
    detail = f"{needed} {'watch' if needed == 1 else 'watches'} needed, "
    detail += f"fs.inotify.max_user_watches is {limit}"
    if needed > limit:
        return Check(
            "inotify",
            False,
            detail,
            f"sysctl -w fs.inotify.max_user_watches={needed * 2}, or `polling: true` on a root",
        )
    return Check("inotify", True, detail)


def check_model(config: Config, model: ModelConfig) -> Check:
    """Loads the model for real: files present or fetched, labels match, provider used."""
    from tagd.tagging import tagger
    from tagd.tagging.hub import ModelError

    name = f"model {model.name}"
    if not model.enabled:
        return Check(name, True, "disabled (enabled: false), not checked")
    try:
        t = tagger.load(config, model)
    except ModelError as exc:
        return Check(name, False, str(exc))
    except Exception as exc:
        return Check(name, False, f"{type(exc).__name__}: {exc}", "see `tagd -v check`")
    where = f"{t.files.model_path.parent}" if model.path else f"{model.repo}@{t.files.revision}"
    return Check(
        name, True, f"{where}, {len(t.labels)} tags, labels match the graph, runs on {t.provider}"
    )


def check_database(config: Config) -> Iterator[Check]:
    db = Path(config.database)
    folder = db.parent
    probe_dir = folder
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    name = f"database {db}"
    if db.exists() and not os.access(db, os.W_OK):
        yield Check(name, False, "not writable", f"chown/chmod {db} for user {os.getuid()}")
        return
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".tagd-check-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        yield Check(
            name,
            False,
            f"cannot write in {probe_dir} ({exc.strerror or exc})",
            "set `database:` to a writable local path",
        )
        return
    state = "exists, writable" if db.exists() else "will be created"
    yield Check(name, True, state)
    free = shutil.disk_usage(probe_dir).free
    detail = f"{free / (1 << 30):.1f} GiB free in {probe_dir}"
    if free < MIN_FREE_BYTES:
        yield Check("disk", False, detail, "free some space (tagd needs about 1 GiB to work)")
    else:
        yield Check("disk", True, detail)


def check_hydrus(config: Config) -> Check | None:
    cfg = config.hydrus
    if cfg is None or not cfg.enabled:
        return None
    from tagd.hydrus.sync import Client, HydrusError, access_key

    try:
        client = Client(cfg.url, access_key(cfg), timeout=min(cfg.timeout, 5.0))
        version = client.api_version()
        client.verify_access_key()
    except HydrusError as exc:
        return Check("hydrus", False, str(exc))
    return Check("hydrus", True, f"{cfg.url} answers (API version {version}), key accepted")


def check_cluster(config: Config) -> Check | None:
    """Joins the configured Ray cluster as `tagd scan` would: reachable, nodes, versions."""
    if config.cluster is None:
        return None
    from tagd.cluster import ClusterError, survey

    address = config.cluster.address
    try:
        found = survey(address)
    except ClusterError as exc:
        reason, _, fix = str(exc).rpartition("; ")
        if not reason:
            reason, fix = fix, ""
        return Check(f"cluster {address}", False, reason, fix)
    nodes = found["nodes"]
    listed = ", ".join(f"{n['host']} ({n['cpus']:g} CPUs, {n['gpus']:g} GPUs)" for n in nodes)
    plural = "node" if len(nodes) == 1 else "nodes"
    return Check(
        f"cluster {address}",
        True,
        f"reachable, {len(nodes)} {plural}: {listed}; Ray {found['ray']}, "
        f"Python {found['python']} match",
    )


def run_checks(config: Config) -> Iterator[Check]:
    """Every check in order; slow ones (model loads) come after the quick ones."""
    yield from check_roots(config)
    yield check_inotify(config)
    yield from check_database(config)
    hydrus = check_hydrus(config)
    if hydrus is not None:
        yield hydrus
    cluster = check_cluster(config)
    if cluster is not None:
        yield cluster
    if not config.models:
        yield Check("models", False, "none configured", "add one under `models:`")
    for model in config.models:
        yield check_model(config, model)
