"""Issue #8, "Nothing a gallery holds can stop tagd": FIFOs and devices, hung decoders, huge
files, truncated files, killed processes and attempts, thread sizing after a CPU fallback.

Real parts throughout: FIFOs and sockets on disk, worker processes, SQLite files, ONNX Runtime
sessions, `tagd` subprocesses killed with SIGKILL. Each test is named after its item.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import stuck_decoder
from conftest import run_tagd, save, wait_for, write_config
from PIL import Image
from stuck_decoder import GreedyDecoder, HangingDecoder

from tagd import config as cfgmod
from tagd.index import db
from tagd.index import jobs as queue
from tagd.ingest import scanner
from tagd.tagging import sizing
from tagd.tagging.decode import DecodeError, read_file
from tagd.tagging.families import WD14
from tagd.tagging.pipeline import Pipeline
from tagd.tagging.tagger import CPU, load_all
from tagd.tagging.workers import Decoded, DecodePool, Decoder, Failed, Setup, Task

SPEC = WD14.preprocess.with_size(448, 448)
SETUP = Setup(specs={"m": SPEC}, model_ids={"m": 1}, max_pixels=50_000_000)


def _collect(pool: DecodePool, n: int, timeout: float = 30.0) -> dict[int, Decoded | Failed]:
    out: dict[int, Decoded | Failed] = {}
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)}/{n} results after {timeout} s"
        r = pool.get(timeout=1.0)
        if r is not None:
            out[r.task_id] = r
    return out


def _rows(database: Path) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return {os.path.basename(r["path"]): r for r in conn.execute("SELECT * FROM jobs")}
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # tagd is still creating the database
            return {}
        raise
    finally:
        conn.close()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """tagd processes a test starts in their own sessions; everything in those process
    groups (forkserver, workers) is killed at the end, whatever the test did."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        for pid in stuck_decoder.group_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


# -- item 2: FIFOs, sockets and devices ----------------------------------------------------


def test_item02_fifo_is_refused(tmp_path: Path, probe_model: Path) -> None:
    """`tagd tag` on a FIFO named like an image returns at once with the reason (it used to
    block in open() until killed); the real image next to it is still tagged."""
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    good = save(tmp_path / "ok.png", (200, 30, 30))
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "TAGD_CONFIG"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tagd",
            "tag",
            "--model",
            str(probe_model),
            "--cpu",
            str(fifo),
            str(good),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "XDG_CONFIG_HOME": str(tmp_path / "xdg")},
    )
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    assert f"{fifo}: not a regular file (a FIFO)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"{good}\t")


def test_item02_sockets_devices_and_folders_are_refused_without_reading(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.png"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    try:
        cases = {
            str(sock_path): "a socket",
            "/dev/zero": "a character device",
            str(tmp_path): "a directory",
        }
        for path, kind in cases.items():
            with pytest.raises(DecodeError) as info:
                read_file(path)
            assert info.value.reason.startswith(f"not a regular file ({kind})")
            assert not info.value.transient and not info.value.gone
    finally:
        server.close()


@pytest.mark.slow
def test_item02_fifo_in_the_queue_fails_at_once_and_the_queue_moves_on(
    tmp_path: Path, gallery: Path, config_file: Path
) -> None:
    """`tagd jobs add` queues a FIFO first in line: the scan fails it on its first attempt
    (no retry) and tags the image queued behind it."""
    fifo = gallery / "pipe.png"
    os.mkfifo(fifo)
    good = save(gallery / "good.png", (10, 200, 90))
    added = run_tagd("-c", str(config_file), "jobs", "add", str(fifo), str(good))
    assert added.returncode == 0, added.stderr
    scan = subprocess.run(
        [sys.executable, "-m", "tagd", "-c", str(config_file), "scan"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert scan.returncode == 0, scan.stderr
    jobs = _rows(tmp_path / "state" / "tagd.db")
    assert jobs["pipe.png"]["state"] == "failed" and jobs["pipe.png"]["attempts"] == 1
    assert "not a regular file (a FIFO)" in jobs["pipe.png"]["error"]
    assert jobs["good.png"]["state"] == "done"


# -- item 3: a decode that never ends ------------------------------------------------------


def test_item03_hung_decode_is_killed_and_the_pool_moves_on(tmp_path: Path) -> None:
    paths = [save(tmp_path / f"{i}.png", (30 * i, 90, 20)) for i in range(3)]
    hang = save(tmp_path / "hang.png", (1, 2, 3))
    order = [paths[0], hang, paths[1], paths[2]]
    factory = functools.partial(HangingDecoder, SETUP)
    with DecodePool(factory, 1, timeout=1.5) as pool:
        first = pool.pids[0]
        started = time.monotonic()
        for i, p in enumerate(order):
            pool.submit(Task(i, str(p), ("m",)))
        out = _collect(pool, len(order))
        assert time.monotonic() - started < 20
        assert pool.timeouts == 1 and pool.crashes == 0 and pool.pids[0] != first
    failed = out[1]
    assert isinstance(failed, Failed) and not failed.transient
    assert "took longer than 1.5 s (inference.decode_timeout)" in failed.reason
    assert all(isinstance(out[i], Decoded) for i in (0, 2, 3))


@pytest.mark.slow
def test_item03_decode_timeout_from_the_config_in_a_real_scan(
    tmp_path: Path, gallery: Path, probe_model: Path, processes: list
) -> None:
    """A real `tagd scan` whose decoder hangs on one file: with `decode_timeout: 2` the scan
    ends, that file failed with the reason, every other file tagged."""
    for i in range(3):
        save(gallery / f"a{i}.png", (60 * i, 40, 200))
    save(gallery / "b-hang.png", (5, 5, 5))
    config = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(tmp_path / "tagd.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {
                "device": "cpu",
                "decode_workers": 1,
                "batch_size": 2,
                "decode_timeout": 2,
            },
        },
    )
    proc = stuck_decoder.start("-c", str(config), "scan", log=tmp_path / "scan.log")
    processes.append(proc)
    assert proc.wait(timeout=90) == 0, (tmp_path / "scan.log").read_text()
    jobs = _rows(tmp_path / "tagd.db")
    assert jobs["b-hang.png"]["state"] == "failed"
    assert "(inference.decode_timeout)" in jobs["b-hang.png"]["error"]
    assert [jobs[f"a{i}.png"]["state"] for i in range(3)] == ["done"] * 3


# -- item 4: attempts across restarts, charged to the right file ---------------------------


@pytest.mark.slow
def test_item04_killed_daemon_charges_only_the_file_being_decoded(
    tmp_path: Path, gallery: Path, probe_model: Path, processes: list
) -> None:
    """A daemon SIGKILLed twice while its decoder hangs on one file (max_attempts 2): that
    file ends failed after its second charged attempt; the healthy files leased beside
    it every time are never charged and end tagged."""
    save(gallery / "a.png", (200, 10, 10))
    save(gallery / "b-hang.png", (5, 5, 5))
    for i in range(3):
        save(gallery / f"c{i}.png", (10, 60 * i, 200))
    database = tmp_path / "tagd.db"
    config = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(database),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu", "decode_workers": 1, "batch_size": 2},
            "daemon": {"max_attempts": 2},
        },
    )
    log = tmp_path / "run.log"
    for kill in range(1, 3):
        proc = stuck_decoder.start("-c", str(config), "run", log=log)
        processes.append(proc)

        def hanging(pid: int = proc.pid) -> sqlite3.Row | None:
            if not database.exists():
                return None
            row = _rows(database).get("b-hang.png")
            owner = row["lease_owner"] if row is not None else None
            marked = row is not None and row["decoding_since"] is not None
            return row if marked and owner and f":{pid}:" in owner else None

        row = wait_for(hanging, timeout=60)
        assert row["attempts"] == kill  # type: ignore[index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # its forkserver and the worker stuck in the codec go with it
        wait_for(lambda pgid=proc.pid: not stuck_decoder.group_pids(pgid), timeout=20)
        jobs = _rows(database)
        healthy = [jobs[n] for n in jobs if n != "b-hang.png"]
        assert all(r["state"] != "failed" for r in healthy)
        assert all(r["attempts"] <= 1 for r in healthy)
    proc = stuck_decoder.start("-c", str(config), "run", log=log)
    processes.append(proc)

    def settled() -> dict[str, sqlite3.Row] | None:
        jobs = _rows(database)
        done = sum(r["state"] == "done" for r in jobs.values())
        return jobs if done == 4 and jobs["b-hang.png"]["state"] == "failed" else None

    jobs = wait_for(settled, timeout=60)
    assert isinstance(jobs, dict)
    assert "tagd stopped 2 times while decoding this file" in jobs["b-hang.png"]["error"]
    assert {n: r["attempts"] for n, r in jobs.items() if n != "b-hang.png"} == {
        "a.png": 1,
        "c0.png": 1,
        "c1.png": 1,
        "c2.png": 1,
    }
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


# -- item 5: memory ------------------------------------------------------------------------


def test_item05_header_estimate_refuses_an_image_over_the_budget(tmp_path: Path) -> None:
    """A 3000x3000 RGBA PNG is a few KB on disk and ~250 MiB to decode and composite: with a
    64 MiB budget it fails from its header, naming the budget; a small image still decodes."""
    big = tmp_path / "big.png"
    Image.new("RGBA", (3000, 3000), (0, 0, 0, 0)).save(big)
    assert big.stat().st_size < 200_000
    small = save(tmp_path / "small.png", (1, 2, 3, 255))
    setup = Setup(SETUP.specs, SETUP.model_ids, SETUP.max_pixels, memory_budget=64 << 20)
    with DecodePool(functools.partial(Decoder, setup), 1, memory_limit=64 << 20) as pool:
        pool.submit(Task(0, str(big), ("m",)))
        pool.submit(Task(1, str(small), ("m",)))
        out = _collect(pool, 2)
    assert isinstance(out[0], Failed) and not out[0].transient
    assert "3000x3000 RGBA image needs about" in out[0].reason
    assert "memory budget of 64 MiB (inference.worker_memory_mb)" in out[0].reason
    assert isinstance(out[1], Decoded) and out[1].tensors["m"].shape == (448, 448, 3)


def test_item05_rlimit_backstop_stops_a_decoder_that_outgrows_the_budget(tmp_path: Path) -> None:
    """A codec that allocates twice the budget despite the estimate hits the worker's
    RLIMIT_DATA: the file fails naming the budget and the same worker decodes the next."""
    greedy = save(tmp_path / "greedy.png", (9, 9, 9))
    with open(greedy, "ab") as fh:
        fh.write(b"greedy")  # after IEND: ignored by PNG decoders, seen by GreedyDecoder
    good = save(tmp_path / "good.png", (90, 9, 9))
    budget = 128 << 20
    setup = Setup(SETUP.specs, SETUP.model_ids, SETUP.max_pixels, memory_budget=budget)
    with DecodePool(functools.partial(GreedyDecoder, setup), 1, memory_limit=budget) as pool:
        pid = pool.pids[0]
        pool.submit(Task(0, str(greedy), ("m",)))
        pool.submit(Task(1, str(good), ("m",)))
        out = _collect(pool, 2)
        assert pool.pids[0] == pid and pool.crashes == 0
    assert isinstance(out[0], Failed)
    assert out[0].reason == (
        "decoding this file needs more than the decode worker's memory budget of 128 MiB "
        "(inference.worker_memory_mb)"
    )
    assert isinstance(out[1], Decoded)
    # without the limit the same allocation succeeds: the limit is what stopped it
    unlimited = Setup(SETUP.specs, SETUP.model_ids, SETUP.max_pixels, memory_budget=budget)
    with DecodePool(functools.partial(GreedyDecoder, unlimited), 1) as pool:
        pool.submit(Task(0, str(greedy), ("m",)))
        assert isinstance(_collect(pool, 1)[0], Decoded)


def test_item05_files_over_max_file_mb_are_refused_unread(tmp_path: Path) -> None:
    """A 3 GiB sparse 'big.jpg' is refused from its size in milliseconds (it used to be read
    whole: 3 GiB per worker); the reason names inference.max_file_mb."""
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(3 << 30)
    setup = Setup(SETUP.specs, SETUP.model_ids, SETUP.max_pixels, max_file_bytes=512 << 20)
    started = time.monotonic()
    result = Decoder(setup)(Task(0, str(big), ("m",)))
    assert time.monotonic() - started < 1.0
    assert isinstance(result, Failed) and not result.transient
    assert result.reason.startswith("file is 3072 MiB, over the inference.max_file_mb limit")
    config = cfgmod.parse({"inference": {"max_file_mb": 1}}, base=tmp_path)
    assert config.inference.max_file_mb == 1
    with pytest.raises(cfgmod.ConfigError, match="inference.max_file_mb"):
        cfgmod.parse({"inference": {"max_file_mb": 0}}, base=tmp_path)


def test_item05_default_budget_shares_half_the_memory_among_the_workers() -> None:
    inference = cfgmod.InferenceConfig()
    assert sizing.worker_memory(inference, 15, memory=64 << 30) == (32 << 30) // 15
    assert sizing.worker_memory(inference, 2, memory=1 << 30) == sizing.MIN_WORKER_MEMORY
    assert sizing.worker_memory(cfgmod.InferenceConfig(worker_memory_mb=300), 4) == 300 << 20
    assert 0 < sizing.machine_memory() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- item 6: truncated files that are not being copied -------------------------------------


def test_item06_settled_truncated_file_fails_in_the_same_scan(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    """A truncated PNG last modified two days ago fails in the scan that finds it; one
    modified just now (within settle_seconds) may still be being copied and waits to retry."""
    noise = np.random.default_rng(6).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    full = (tmp_path / "full.png").read_bytes()
    old = gallery / "old.png"
    old.write_bytes(full[: len(full) // 2])
    two_days = time.time() - 2 * 86400
    os.utime(old, (two_days, two_days))
    (gallery / "new.png").write_bytes(full[: len(full) // 2])
    save(gallery / "ok.png", (1, 200, 3))
    data = {
        "database": str(tmp_path / "tagd.db"),
        "watch": [str(gallery)],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu", "decode_workers": 1},
        "daemon": {"settle_seconds": 600},
    }
    config = cfgmod.parse(data, base=tmp_path)
    conn = db.connect(config.database)
    scanner.scan(conn, config)
    with Pipeline(conn, config, load_all(config)) as pipeline:
        outcome = pipeline.run()
    assert (outcome.done, outcome.failed, outcome.retrying) == (1, 1, 1)
    jobs = _rows(tmp_path / "tagd.db")
    assert jobs["old.png"]["state"] == "failed" and "truncated" in jobs["old.png"]["error"]
    assert jobs["new.png"]["state"] == "queued" and jobs["new.png"]["not_before"] > time.time()
    conn.close()


# -- item 9: a killed `tagd scan` ----------------------------------------------------------


@pytest.mark.slow
def test_item09_killed_scan_leases_are_reclaimed_by_the_next_scan(
    tmp_path: Path, gallery: Path, config_file: Path, processes: list
) -> None:
    """SIGKILL a `tagd scan` while it holds leases (its decoder stuck on one file): the next
    `tagd scan` takes them back at once and tags everything (it used to report "tagged 0"
    until the 300 s lease ran out). Only the stuck file was charged an attempt."""
    for i in range(5):
        save(gallery / f"a{i}.png", (50 * i, 100, 30))
    save(gallery / "a2-hang.png", (3, 3, 3))
    database = tmp_path / "state" / "tagd.db"
    proc = stuck_decoder.start("-c", str(config_file), "scan", log=tmp_path / "scan.log")
    processes.append(proc)

    def stuck() -> bool:
        if not database.exists():
            return False
        row = _rows(database).get("a2-hang.png")
        return row is not None and row["decoding_since"] is not None

    wait_for(stuck, timeout=60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    leased = [r for r in _rows(database).values() if r["state"] == "running"]
    assert leased, "the killed scan held no leases"
    again = subprocess.run(
        [sys.executable, "-m", "tagd", "-c", str(config_file), "scan"],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert again.returncode == 0, again.stderr
    jobs = _rows(database)
    assert {r["state"] for r in jobs.values()} == {"done"}, {n: r["state"] for n, r in jobs.items()}
    assert jobs["a2-hang.png"]["attempts"] == 2
    assert all(r["attempts"] == 1 for n, r in jobs.items() if n != "a2-hang.png")
    wait_for(lambda: not stuck_decoder.group_pids(proc.pid), timeout=20)


def test_item09_lease_owner_names_the_process_start(tmp_path: Path) -> None:
    """The owner records host, pid and /proc start time: a live owner is kept, a dead pid or
    a reused pid (same pid, other start time) is reclaimed, another host's owner is kept."""
    host = socket.gethostname()
    conn = db.connect(tmp_path / "q.db")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = wait_for(lambda: queue.process_start(child.pid))
        owners = {
            "/g/live": f"{host}:{child.pid}:{start}",
            "/g/reused": f"{host}:{child.pid}:{int(str(start)) + 1}",
            "/g/other-host": f"elsewhere:{child.pid}:1",
        }
        with db.write(conn):
            for path in owners:
                queue.enqueue(conn, path, 1, 1)
        for path, owner in owners.items():
            conn.execute(
                "UPDATE jobs SET state='running', lease_owner=?, lease_expires=?,"
                " attempts=1 WHERE path=?",
                (owner, time.time() + 300, path),
            )
        assert queue.reap_orphans(conn, "me", host) == 1
        child.kill()
        child.wait(timeout=10)
        assert queue.reap_orphans(conn, "me", host) == 1
        states = dict(conn.execute("SELECT path, state FROM jobs").fetchall())
        assert states == {"/g/live": "queued", "/g/reused": "queued", "/g/other-host": "running"}
        attempts = conn.execute("SELECT max(attempts) FROM jobs WHERE state='queued'").fetchone()
        assert attempts[0] == 0
    finally:
        child.kill()
        child.wait(timeout=10)
        conn.close()


# -- item 15: threads decided once, from the provider in use -------------------------------


def test_item15_cpu_fallback_is_sized_for_the_cpu(
    tmp_path: Path, probe_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`device: auto` on a host where a driver is present but CUDA cannot start: ONNX Runtime
    falls back to the CPU. The session is rebuilt with the CPU plan's threads (it kept the
    GPU plan's single thread), the same plan the pipeline uses."""
    import onnxruntime as ort

    from tagd.tagging import session, tagger

    monkeypatch.setattr(session, "nvidia_present", lambda: True)
    available = ort.get_available_providers()
    if tagger.CUDA not in available:
        monkeypatch.setattr(ort, "get_available_providers", lambda: [tagger.CUDA, CPU])
    monkeypatch.setattr(sizing, "available_cores", lambda: 4)
    data = {"database": str(tmp_path / "t.db"), "models": [{"name": "p", "path": str(probe_model)}]}
    config = cfgmod.parse(data, base=tmp_path)
    assert tagger.expects_gpu(config.inference)  # what the first session was sized for
    (loaded,) = load_all(config)
    cpu_plan = sizing.plan(config.inference, gpu=False, cores=4)
    assert loaded.provider == CPU
    assert loaded.threads == cpu_plan.ort_threads == 4
    assert loaded.cpu_fallback
    assert loaded.session.get_session_options().intra_op_num_threads == 4
    conn = db.connect(config.database)
    with Pipeline(conn, config, [loaded]) as pipeline:
        assert pipeline.plan == cpu_plan
    probs = loaded.predict(np.zeros((1, *loaded.spec.size, 3), dtype=np.float32))
    assert probs.shape[0] == 1
    conn.close()
