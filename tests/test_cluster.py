"""Tagging on a Ray cluster: config, identical results, worker and coordinator faults.

One local Ray cluster serves the in-process tests of this module (2 CPUs, no dashboard, a
small object store); the coordinator-kill test runs `tagd scan` subprocesses that start their
own (`address: local`), as a user's would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_tagd, wait_for, write_config
from media_video import write_animation, write_video
from onnx_models import build_wd_folder
from PIL import Image

from tagd import config as cfgmod
from tagd.config import ConfigError
from tagd.index import db, jobs
from tagd.ingest import scanner
from tagd.tagging import tagger
from tagd.tagging.pipeline import Pipeline

pytest.importorskip("ray")


def _noise_images(folder: Path, n: int, size: tuple[int, int] = (900, 700)) -> list[Path]:
    """Distinct PNGs that take a few tens of ms each to decode, so a batch is in flight long
    enough to be killed mid-way."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"img{i:03d}.png"
        Image.fromarray(arr).save(path, compress_level=1)
        out.append(path)
    return out


def _config(
    tmp: Path, gallery: Path, model: Path, name: str, batch: int = 2, **extra: Any
) -> cfgmod.Config:
    data: dict[str, Any] = {
        "database": str(tmp / f"{name}.db"),
        "watch": [{"path": str(gallery)}],
        "models": [{"name": "probe", "path": str(model)}],
        "inference": {"device": "cpu", "batch_size": batch, "threads": 1},
        **extra,
    }
    return cfgmod.parse(data, base=tmp)


# -- config (no Ray needed) -------------------------------------------------------------------


def test_cluster_section_parses_and_bad_values_name_the_key(tmp_path: Path) -> None:
    base = {"database": str(tmp_path / "t.db")}
    assert cfgmod.parse(base, base=tmp_path).cluster is None
    c = cfgmod.parse(
        {
            **base,
            "cluster": {
                "address": "ray://nas:10001",
                "num_gpus": 1,
                "actors": 3,
                "path_map": {"/srv/gallery": "/mnt/nas/gallery/"},
                "max_in_flight": 6,
            },
        },
        base=tmp_path,
    ).cluster
    assert c is not None
    assert (c.engine, c.address, c.num_gpus, c.actors, c.max_in_flight) == (
        "ray",
        "ray://nas:10001",
        1.0,
        3,
        6,
    )
    assert c.path_map == (("/srv/gallery", "/mnt/nas/gallery"),)
    bad = [
        ({"engine": "dask"}, "cluster.engine"),
        ({"address": "nas"}, "cluster.address"),
        ({"path_map": {"rel": "/x"}}, "cluster.path_map"),
        ({"num_gpus": -1}, "cluster.num_gpus"),
        ({"max_in_flight": 0}, "cluster.max_in_flight"),
        ({"nodes": 2}, "cluster.nodes"),
    ]
    for value, key in bad:
        with pytest.raises(ConfigError) as err:
            cfgmod.parse({**base, "cluster": value}, base=tmp_path)
        assert key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_no_ray_import_without_cluster(tmp_path: Path, probe_model: Path) -> None:
    gallery = tmp_path / "g"
    _noise_images(gallery, 2, (64, 48))
    plain = write_config(
        tmp_path / "plain.yaml",
        {
            "database": str(tmp_path / "plain.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
        },
    )
    code = (
        "import sys\nfrom tagd import cli\n"
        f"rc = cli.main(['--config', {str(plain)!r}, 'scan'])\n"
        "print('RC', rc, 'RAY', 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert "RC 0 RAY False" in out.stdout, out.stderr
    conn = db.connect(tmp_path / "plain.db")
    assert jobs.counts(conn)["done"] == 2
    conn.close()


# -- on a local Ray cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # noqa: SIM112 (Ray spells it so)
    import ray

    # A private temp dir: `ray start` (the node-leaving test) records the cluster's address
    # in the head's temp dir, where any other `ray.init()` on this machine would find it.
    temp = tempfile.mkdtemp(prefix="tagd-ray-")
    ray.init(
        address="local",
        _temp_dir=temp,
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        logging_level="WARNING",
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cluster")
    model = build_wd_folder(root / "probe")
    gallery = root / "gallery"
    _noise_images(gallery, 24)
    (gallery / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return gallery, model


@pytest.fixture(scope="module")
def actors(ray_cluster: Any, corpus: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """Two workers shared by the in-process tests (half a CPU each, so a third fits)."""
    from tagd.cluster import ray_backend as rb

    gallery, model = corpus
    cfg = _config(tmp_path_factory.mktemp("actors"), gallery, model, "x", batch=1, cluster={})
    handles = [rb.spawn(cfg, num_cpus=0.5, num_gpus=0) for _ in range(2)]
    try:
        yield handles
    finally:
        for h in handles:
            ray_cluster.kill(h)


def _scan(cfg: cfgmod.Config) -> sqlite3.Connection:
    conn = db.connect(cfg.database)
    scanner.scan(conn, cfg)
    return conn


def _rows(conn: sqlite3.Connection) -> dict[str, Any]:
    scores = conn.execute(
        """SELECT f.sha256, t.name, s.score, s.selected FROM scores s
           JOIN files f ON f.id = s.file_id JOIN tags t ON t.id = s.tag_id
           ORDER BY 1, 2"""
    ).fetchall()
    emb = conn.execute(
        """SELECT f.sha256, e.dim, e.dtype, e.vector FROM embeddings e
           JOIN files f ON f.id = e.file_id ORDER BY 1"""
    ).fetchall()
    files = conn.execute("SELECT sha256, size, width, height, format FROM files ORDER BY 1")
    return {
        "scores": [tuple(r) for r in scores],
        "embeddings": [tuple(r) for r in emb],
        "files": [tuple(r) for r in files.fetchall()],
        "jobs": jobs.counts(conn),
    }


def _count_taggings(conn: sqlite3.Connection) -> None:
    """Every insert or update of a file's tagging lands in `writes`: stored exactly once means
    one row per file."""
    conn.executescript(
        """CREATE TABLE IF NOT EXISTS writes(file_id INTEGER);
           CREATE TRIGGER IF NOT EXISTS w_ins AFTER INSERT ON taggings
               BEGIN INSERT INTO writes VALUES (NEW.file_id); END;
           CREATE TRIGGER IF NOT EXISTS w_upd AFTER UPDATE ON taggings
               BEGIN INSERT INTO writes VALUES (NEW.file_id); END;"""
    )


@pytest.mark.slow
def test_cluster_rows_equal_local_pipeline(
    tmp_path: Path, corpus: tuple[Path, Path], actors: list[Any]
) -> None:
    from tagd.cluster.coordinator import ClusterPipeline

    gallery, model = corpus
    # Batch 1 on both sides: ONNX Runtime's CPU reductions differ in the 5th decimal between
    # a batch of 1 and of 2, and which files share a batch depends on decode timing (in the
    # local pipeline too). With the batch fixed, the rows must be bit-for-bit the same.
    local_cfg = _config(tmp_path, gallery, model, "local", batch=1)
    conn = _scan(local_cfg)
    with Pipeline(conn, local_cfg, tagger.load_all(local_cfg)) as p:
        p.run()
    local = _rows(conn)
    conn.close()

    cluster_cfg = _config(tmp_path, gallery, model, "cluster", batch=1, cluster={})
    conn = _scan(cluster_cfg)
    cp = ClusterPipeline(conn, cluster_cfg, tagger.load_all(cluster_cfg), actors=actors)
    try:
        outcome = cp.run()
    finally:
        cp.close()
    remote = _rows(conn)
    assert outcome.done == 24 and outcome.failed == 1
    assert local["jobs"] == remote["jobs"] == {"queued": 0, "running": 0, "done": 24, "failed": 1}
    assert remote["files"] == local["files"] and len(remote["files"]) == 24
    assert remote["scores"] == local["scores"] and remote["scores"]
    assert remote["embeddings"] == local["embeddings"]
    # The coordinator shipped the compressed files, never tensors.
    assert cp.bytes_shipped == sum(p.stat().st_size for p in gallery.iterdir())
    conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("mapped", [False, True], ids=["shipped", "path_map"])
def test_cluster_samples_videos_and_animations_like_the_local_pipeline(
    tmp_path: Path, corpus: tuple[Path, Path], actors: list[Any], mapped: bool
) -> None:
    """Shipped bytes (the video decoded from memory) and a mapped path (decoded from disk)."""
    from tagd.cluster.coordinator import ClusterPipeline

    _, model = corpus
    gallery = tmp_path / "media"
    write_video(gallery / "clip.mp4")
    write_animation(gallery / "loop.gif", "GIF")
    Image.new("RGB", (40, 30), (0, 255, 0)).save(gallery / "still.png")
    media_sql = "SELECT sha256, duration, frames, fps FROM files ORDER BY 1"

    local_cfg = _config(tmp_path, gallery, model, "local", batch=1)
    conn = _scan(local_cfg)
    with Pipeline(conn, local_cfg, tagger.load_all(local_cfg)) as p:
        p.run()
    local, local_media = _rows(conn), conn.execute(media_sql).fetchall()
    conn.close()

    section = {"path_map": {str(gallery): str(gallery)}} if mapped else {}
    cluster_cfg = _config(tmp_path, gallery, model, "cluster", batch=1, cluster=section)
    conn = _scan(cluster_cfg)
    cp = ClusterPipeline(conn, cluster_cfg, tagger.load_all(cluster_cfg), actors=actors)
    try:
        outcome = cp.run()
    finally:
        cp.close()
    assert cp.bytes_shipped == (0 if mapped else sum(f.stat().st_size for f in gallery.iterdir()))
    remote, remote_media = _rows(conn), conn.execute(media_sql).fetchall()
    conn.close()
    assert outcome.done == 3 and outcome.failed == 0
    assert remote["jobs"] == local["jobs"] == {"queued": 0, "running": 0, "done": 3, "failed": 0}
    assert remote["files"] == local["files"]
    assert {r[4] for r in remote["files"]} == {"MPEG4", "GIF", "PNG"}
    assert remote["scores"] == local["scores"] and remote["scores"]
    assert remote["embeddings"] == local["embeddings"]
    assert [tuple(r) for r in remote_media] == [tuple(r) for r in local_media]
    kinds = sorted((r[2] or 0, r[1]) for r in remote_media)
    assert kinds == [(0, None), (10, pytest.approx(1.0)), (50, 5.0)]


@pytest.mark.slow
def test_worker_sigkill_mid_batch_tags_every_file_exactly_once(
    tmp_path: Path, corpus: tuple[Path, Path], actors: list[Any], ray_cluster: Any
) -> None:
    from tagd.cluster.coordinator import ClusterPipeline

    gallery, model = corpus
    cfg = _config(tmp_path, gallery, model, "kill", cluster={"max_in_flight": 4})
    conn = _scan(cfg)
    _count_taggings(conn)
    cp = ClusterPipeline(conn, cfg, tagger.load_all(cfg), actors=actors)
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            result["outcome"] = cp.run()
        except BaseException as exc:
            result["error"] = exc

    cp.start()
    thread = threading.Thread(target=drive)
    thread.start()
    try:
        victim = wait_for(
            lambda: next((a for a in cp.actors if a.outstanding >= 2), None), timeout=60
        )
        # The coordinator updates victim.info when the restarted worker reports back.
        killed = victim.info["pid"]
        os.kill(killed, signal.SIGKILL)
        thread.join(90)
        assert not thread.is_alive()
    finally:
        cp.close()
    assert "error" not in result, result.get("error")
    assert cp.deaths >= 1 and cp.resubmitted >= 1
    assert result["outcome"].done == 24
    assert jobs.counts(conn) == {"queued": 0, "running": 0, "done": 24, "failed": 1}
    writes = conn.execute("SELECT file_id, count(*) FROM writes GROUP BY file_id").fetchall()
    assert len(writes) == 24 and {n for _, n in writes} == {1}

    # Ray restarted the killed worker with its models: it takes work again.
    def restarted_pid() -> int | None:
        try:
            return ray_cluster.get(victim.handle.pid.remote(), timeout=30)
        except ray_cluster.exceptions.ActorUnavailableError:
            return None

    wait_for(lambda: restarted_pid() not in (None, killed), timeout=60)
    conn.close()


@pytest.fixture
def second_node(ray_cluster: Any, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A second Ray node on loopback (`ray start --address`), with a `leaver` resource to pin
    a worker there; its own process group, so the test can take the whole node away."""
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    start = ["start", f"--address={address}", "--num-cpus=1", '--resources={"leaver": 1}']
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", *start, "--block", "--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "node.log").open("wb"),
        start_new_session=True,
    )
    try:
        wait_for(lambda: ray_cluster.cluster_resources().get("leaver") == 1.0, timeout=60)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.slow
def test_a_node_leaving_mid_run_tags_every_file_exactly_once(
    tmp_path: Path,
    corpus: tuple[Path, Path],
    actors: list[Any],
    ray_cluster: Any,
    second_node: subprocess.Popen,
) -> None:
    from tagd.cluster import ray_backend as rb
    from tagd.cluster.coordinator import ClusterPipeline

    gallery, model = corpus
    cfg = _config(tmp_path, gallery, model, "leave", cluster={"max_in_flight": 4})
    leaver = (
        ray_cluster.remote(rb.TagActor)
        .options(num_cpus=0.5, resources={"leaver": 1}, max_restarts=-1, max_task_retries=0)
        .remote(cfg, 1, None)
    )
    conn = _scan(cfg)
    _count_taggings(conn)
    cp = ClusterPipeline(conn, cfg, tagger.load_all(cfg), actors=[leaver, actors[0]])
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            result["outcome"] = cp.run()
        except BaseException as exc:
            result["error"] = exc

    cp.start()
    away = next(a for a in cp.actors if a.handle == leaver)
    thread = threading.Thread(target=drive)
    thread.start()
    try:
        wait_for(lambda: away.outstanding >= 1, timeout=60)
        os.killpg(second_node.pid, signal.SIGKILL)  # raylet, its workers: the node is gone
        thread.join(100)
        assert not thread.is_alive()
    finally:
        cp.close()
        ray_cluster.kill(leaver)
    assert "error" not in result, result.get("error")
    assert cp.deaths >= 1 and cp.resubmitted >= 1 and away.state != "ready"
    assert result["outcome"].done == 24
    assert jobs.counts(conn) == {"queued": 0, "running": 0, "done": 24, "failed": 1}
    writes = conn.execute("SELECT file_id, count(*) FROM writes GROUP BY file_id").fetchall()
    assert len(writes) == 24 and {n for _, n in writes} == {1}
    conn.close()


@pytest.mark.slow
def test_worker_whose_model_fails_to_load_is_reported_and_others_continue(
    tmp_path: Path, corpus: tuple[Path, Path], actors: list[Any], ray_cluster: Any
) -> None:
    from tagd.cluster import ray_backend as rb
    from tagd.cluster.coordinator import ClusterPipeline
    from tagd.index.status import format_report, report

    gallery, model = corpus
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"truncated download")
    (broken / "selected_tags.csv").write_bytes((model / "selected_tags.csv").read_bytes())
    bad_cfg = _config(tmp_path, gallery, broken, "bad", cluster={})
    bad = rb.spawn(bad_cfg, num_cpus=0.5, num_gpus=0)
    cfg = _config(tmp_path, gallery, model, "one-bad", cluster={})
    conn = _scan(cfg)
    cp = ClusterPipeline(conn, cfg, tagger.load_all(cfg), actors=[bad, actors[0]])
    try:
        outcome = cp.run()
    finally:
        cp.close()
        ray_cluster.kill(bad)
    assert len(cp.actors) == 1 and outcome.done == 24
    assert jobs.counts(conn)["done"] == 24
    status = report(conn)
    assert "cannot be loaded by ONNX Runtime" in (status["last_error"] or "")
    text = format_report(status)
    assert "cluster:" in text and "worker:" in text and "24 files" in text
    conn.close()


@pytest.mark.slow
def test_worker_without_the_model_gets_it_from_the_coordinator(
    tmp_path: Path, corpus: tuple[Path, Path], ray_cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from tagd.cluster.coordinator import ClusterPipeline

    gallery, model = corpus
    # The workers look for the model folder where no such folder exists on their side.
    cluster = {
        "actors": 1,
        "num_cpus": 0.5,
        "path_map": {str(model): str(tmp_path / "not-mounted")},
    }
    cfg = _config(tmp_path, gallery, model, "ship", cluster=cluster)
    conn = _scan(cfg)
    cp = ClusterPipeline(conn, cfg, tagger.load_all(cfg))
    try:
        with caplog.at_level("INFO", logger="tagd.cluster.coordinator"):
            outcome = cp.run()
    finally:
        cp.close()
    assert "cannot fetch probe; sending the model files" in caplog.text
    assert outcome.done == 24
    assert jobs.counts(conn)["done"] == 24
    conn.close()


# -- the coordinator process killed and restarted ---------------------------------------------


@pytest.mark.slow
def test_coordinator_sigkill_then_restart_completes_the_work(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    gallery, model = corpus
    cfg_path = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "c.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(model)}],
            "inference": {"device": "cpu"},
            "cluster": {"engine": "ray", "address": "local", "num_cpus": 0.5},
        },
    )
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("TAGD_CONFIG", None)
    args = [sys.executable, "-m", "tagd", "--config", str(cfg_path), "scan"]
    conn = db.connect(tmp_path / "c.db")
    _count_taggings(conn)

    def done() -> int:
        return conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]

    first = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for(lambda: done() >= 2 or first.poll() is not None, timeout=90)
        assert first.poll() is None, "the first scan finished before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    assert done() < 24
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=100)
    assert second.returncode == 0, second.stderr
    assert "jobs left running by a stopped tagd are queued again" in second.stderr
    states = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    assert states == {"done": 24, "failed": 1}
    writes = conn.execute("SELECT file_id, count(*) FROM writes GROUP BY file_id").fetchall()
    assert len(writes) == 24 and {n for _, n in writes} == {1}
    conn.close()


@pytest.mark.slow
def test_unreachable_head_is_a_one_line_error_and_jobs_stay_queued(
    tmp_path: Path, probe_model: Path
) -> None:
    gallery = tmp_path / "g"
    _noise_images(gallery, 2, (64, 48))
    cfg = write_config(
        tmp_path / "u.yaml",
        {
            "database": str(tmp_path / "u.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
            "cluster": {"address": "127.0.0.1:1"},
        },
    )
    out = run_tagd("--config", str(cfg), "scan")
    assert out.returncode == 3
    assert "cluster.address 127.0.0.1:1: cannot join the Ray cluster" in out.stderr
    assert "Traceback" not in out.stderr
    conn = db.connect(tmp_path / "u.db")
    assert jobs.counts(conn) == {"queued": 2, "running": 0, "done": 0, "failed": 0}
    conn.close()


# -- tagd check --------------------------------------------------------------------------------


def _check_config(tmp: Path, model: Path, address: str) -> Path:
    gallery = tmp / "g"
    _noise_images(gallery, 1, (32, 24))
    return write_config(
        tmp / "check.yaml",
        {
            "database": str(tmp / "c.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(model)}],
            "inference": {"device": "cpu"},
            "cluster": {"address": address},
        },
    )


@pytest.mark.slow
def test_check_joins_the_local_cluster_and_lists_its_node(
    tmp_path: Path, probe_model: Path
) -> None:
    out = run_tagd("--config", str(_check_config(tmp_path, probe_model, "local")), "check")
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "cluster local" in ln)
    import ray

    assert line.startswith("ok   cluster local: reachable, 1 node: "), line
    assert f"Ray {ray.__version__}, Python {sys.version.split()[0]} match" in line
    assert "CPUs" in line and "GPUs" in line
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_check_with_an_unreachable_head_fails_fast_with_the_fix(
    tmp_path: Path, probe_model: Path
) -> None:
    cfg = _check_config(tmp_path, probe_model, "127.0.0.1:1")
    start = time.monotonic()
    out = run_tagd("--config", str(cfg), "check")
    took = time.monotonic() - start
    assert out.returncode == 1
    line = next(ln for ln in out.stdout.splitlines() if "cluster 127.0.0.1:1" in ln)
    assert line.startswith(
        "FAIL cluster 127.0.0.1:1: not reachable: nothing answers at 127.0.0.1:1"
    )
    assert "-> start it with `ray start --head`" in line
    assert took < 60, took  # the whole command, model load included; Ray alone retries minutes
    assert "Traceback" not in out.stderr


def test_ray_version_mismatch_becomes_one_line_with_the_fix() -> None:
    """The text Ray raises when versions differ, made by Ray's own check."""
    from ray._private.utils import check_version_info

    from tagd.cluster import ray_backend as rb

    with pytest.raises(RuntimeError) as err:
        check_version_info(
            {"ray_version": "2.9.3", "python_version": "3.10.12"},
            "10.0.0.5",
            raise_on_mismatch=True,
        )
    line = rb.version_fix(str(err.value))
    import ray

    here = sys.version.split()[0]
    assert line == (
        f"version mismatch: the cluster runs Ray 2.9.3 on Python 3.10.12, this machine Ray "
        f"{ray.__version__} on Python {here}; install ray==2.9.3 with Python 3.10 on every machine"
    )
    assert rb.version_fix("some other failure") is None


# -- the Ray head restarting mid-run ----------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _head(port: int, temp: Path, log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A `ray start --head --block` in its own process group with a private temp dir (its
    address file stays there, never in /tmp/ray), killed whole on the way out."""
    start = [
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp}",
        "--block",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", *start],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        start_new_session=True,
    )
    try:
        # `ray start` records the address once the head is up (in the private temp dir).
        wait_for(
            lambda: (temp / "ray_current_cluster").exists() or proc.poll() is not None,
            timeout=60,
        )
        assert proc.poll() is None, log.read_text()[-2000:]
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        (temp / "ray_current_cluster").unlink(missing_ok=True)


@pytest.mark.slow
def test_head_killed_mid_run_loses_nothing_and_the_next_run_finishes(
    tmp_path: Path, corpus: tuple[Path, Path]
) -> None:
    gallery, model = corpus
    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="tagd-head-"))
    cfg_path = write_config(
        tmp_path / "h.yaml",
        {
            "database": str(tmp_path / "h.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(model)}],
            "inference": {"device": "cpu"},
            "cluster": {"engine": "ray", "address": f"127.0.0.1:{port}", "num_cpus": 0.5},
        },
    )
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    env.pop("TAGD_CONFIG", None)
    env.pop("RAY_ADDRESS", None)
    # A loopback-only head: tokens would come from ~/.ray, shared with every other Ray here.
    env["RAY_AUTH_MODE"] = "disabled"
    args = [sys.executable, "-m", "tagd", "--config", str(cfg_path), "scan"]
    conn = db.connect(tmp_path / "h.db")
    _count_taggings(conn)

    def count(state: str) -> int:
        return conn.execute("SELECT count(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    try:
        with _head(port, temp, tmp_path / "head1.log", env) as head:
            first = subprocess.Popen(
                args,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                wait_for(lambda: count("done") >= 2 or first.poll() is not None, timeout=60)
                assert first.poll() is None, first.communicate()[1][-3000:]
                os.killpg(head.pid, signal.SIGKILL)
                _, err = first.communicate(timeout=60)
            finally:
                if first.poll() is None:
                    os.killpg(first.pid, signal.SIGKILL)
                    first.wait(10)
        # Ray's core worker ends the driver itself (`_exit(1)`) when the head's raylet dies
        # under it; tagd's exit watcher prints the line. A Ray error reaching Python first is
        # turned into tagd's own line (exit 3).
        assert "Traceback" not in err
        assert first.returncode != 0
        lines = [ln for ln in err.splitlines() if "cluster.address 127.0.0.1" in ln]
        assert len(lines) == 1, err[-3000:]
        assert (
            "the Ray cluster went away mid-run" in lines[0]
            or "the Ray cluster stopped answering mid-run" in lines[0]
        ), lines
        assert 2 <= count("done") < 24
        # Nothing lost: every unfinished job is queued or still leased to the dead coordinator.
        leased = conn.execute(
            "SELECT DISTINCT lease_owner FROM jobs WHERE state = 'running'"
        ).fetchall()
        assert all(str(first.pid) in (o or "") for (o,) in leased), leased
        assert count("queued") + count("running") + count("done") + count("failed") == 25
        with _head(port, temp, tmp_path / "head2.log", env):
            second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert "went away" not in second.stderr and "Traceback" not in second.stderr
        if leased:
            assert "jobs left running by a stopped tagd are queued again" in second.stderr
        states = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        assert states == {"done": 24, "failed": 1}
        writes = conn.execute("SELECT file_id, count(*) FROM writes GROUP BY file_id").fetchall()
        assert len(writes) == 24 and {n for _, n in writes} == {1}
    finally:
        conn.close()
        shutil.rmtree(temp, ignore_errors=True)
