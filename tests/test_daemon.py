"""`tagd run` as a real subprocess: SIGKILL mid-batch and restart, sd_notify, SIGTERM, and the
CLI reading and writing the database while the daemon works."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_tagd, save, wait_for, write_config

N_IMAGES = 40


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="tagd-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "n.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()
    os.unlink(os.path.join(folder, "n.sock"))
    os.rmdir(folder)


def messages(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def wait_message(sock: socket.socket, prefix: str, timeout: float = 30.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.extend(messages(sock))
        if any(m.startswith(prefix) for m in seen):
            return seen
    raise AssertionError(f"no {prefix} in {seen}")


def start(
    config: Path, sock: socket.socket, log: Path | None = None, **env: str
) -> subprocess.Popen[bytes]:
    full = {**os.environ, "NOTIFY_SOCKET": sock.getsockname(), **env}
    full.pop("WATCHDOG_PID", None)
    with open(log or os.devnull, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "tagd", "-c", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=full,
        )


@pytest.fixture
def daemon_config(tmp_path: Path, gallery: Path, probe_model: Path) -> Path:
    rng = random.Random(3)
    for i in range(N_IMAGES):
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        save(gallery / f"d{i % 4}" / f"{i:03d}.png", color, size=(600 + i, 400))
    return write_config(
        tmp_path / "config.yaml",
        {
            "database": str(tmp_path / "state" / "tagd.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu", "batch_size": 2, "threads": 1},
            "daemon": {"settle_seconds": 0.3, "rank_cache_interval": 1},
        },
    )


def rank_cache_seq(db: Path) -> int | None:
    try:
        return json.loads(Path(f"{db}.rank.json").read_text())["seq"]
    except (OSError, ValueError):
        return None


def max_change_seq(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT max(seq) FROM score_changes").fetchone()[0]
    finally:
        conn.close()


def db_counts(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    finally:
        conn.close()


@pytest.mark.slow
def test_sigkill_mid_batch_then_restart_tags_everything_once(
    daemon_config: Path, tmp_path: Path, gallery: Path, notify_socket: socket.socket
) -> None:
    db_path = tmp_path / "state" / "tagd.db"
    rng = random.Random(7)
    left_running = 0
    for target in (3, 12, 24):
        proc = start(daemon_config, notify_socket)
        wait_message(notify_socket, "READY=1")
        wait_for(lambda t=target: db_counts(db_path).get("done", 0) >= t)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        left_running += db_counts(db_path).get("running", 0)
    assert left_running > 0, "no kill landed in the middle of a batch"
    conn = sqlite3.connect(db_path)
    running = conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'").fetchone()[0]
    log = tmp_path / "last.log"
    done_before = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0]
    total = N_IMAGES
    if done_before == N_IMAGES:
        # A loaded machine let the last kill land after the work: files added while the
        # daemon is down give the restart work of its own.
        for i in range(6):
            save(gallery / "late" / f"{i}.png", (40 * i, 90, 200), size=(500, 300 + i))
        total += 6

    # Last start: a watchdog is expected, and SIGTERM must end it cleanly.
    proc = start(daemon_config, notify_socket, log, WATCHDOG_USEC="1000000")
    seen = wait_message(notify_socket, "READY=1")
    ready = next(m for m in seen if m.startswith("READY=1"))
    assert "STATUS=queue=" in ready and "provider=CPUExecutionProvider" in ready
    wait_for(lambda: db_counts(db_path) == {"done": total})
    seen += wait_message(notify_socket, "WATCHDOG=1", timeout=5)
    seen += wait_message(notify_socket, "STATUS=queue=0 running=0 failed=0", timeout=10)
    messages(notify_socket)
    proc.send_signal(signal.SIGHUP)
    reload = wait_message(notify_socket, "READY=1", timeout=15)
    assert reload[0].startswith("RELOADING=1\nMONOTONIC_USEC="), reload
    assert "reloading" in log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, log.read_text()
    assert "STOPPING=1" in messages(notify_socket)
    if running:
        assert "left running by a stopped tagd are queued again" in log.read_text()

    files = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    assert files == total
    assert conn.execute("SELECT count(*) FROM taggings").fetchone()[0] == total
    assert conn.execute("SELECT count(*) FROM paths WHERE missing = 0").fetchone()[0] == total
    rows, distinct = conn.execute(
        "SELECT count(*), count(DISTINCT file_id || ':' || model_id || ':' || tag_id) FROM scores"
    ).fetchone()
    assert rows == distinct and rows > 0
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == total
    assert (
        conn.execute("SELECT count(*) FROM jobs WHERE lease_owner IS NOT NULL").fetchone()[0] == 0
    )


@pytest.mark.slow
def test_cli_works_while_the_daemon_writes(
    daemon_config: Path, tmp_path: Path, gallery: Path, notify_socket: socket.socket
) -> None:
    db_path = tmp_path / "state" / "tagd.db"
    (gallery / "broken.png").write_bytes(b"not an image at all")
    proc = start(daemon_config, notify_socket)
    try:
        wait_message(notify_socket, "READY=1")
        cfg = str(daemon_config)
        results = []
        # `tagd similar` asks the daemon first: its socket beside the database.
        assert Path(f"{db_path}.query.sock").is_socket()
        wait_for(lambda: db_counts(db_path).get("done", 0) > 0)
        results.append(run_tagd("-c", cfg, "pause"))
        # The pause has landed once the batch in flight is stored and nothing is leased.
        wait_for(lambda: db_counts(db_path).get("running", 0) == 0)
        paused_at = db_counts(db_path).get("done", 0)
        # files arriving while paused are queued, not tagged (whether or not the first
        # batch of the gallery was already finished when the pause landed)
        for i in range(3):
            save(gallery / f"late{i}.png", (10 * i, 20, 30), size=(300, 200))
        wait_for(
            lambda: (
                db_counts(db_path).get("done", 0) + db_counts(db_path).get("queued", 0)
                >= N_IMAGES + 3
            )
        )
        for _ in range(3):
            results.append(run_tagd("-c", cfg, "status"))
            results.append(run_tagd("-c", cfg, "jobs"))
        # The daemon's status line counts the late files as queued while still paused:
        # its main loop has run since they arrived, and nothing was tagged meanwhile.
        messages(notify_socket)
        status_lines = wait_message(notify_socket, "STATUS=queue=", timeout=15)
        assert any(m.rstrip().endswith("paused") for m in status_lines), status_lines
        assert db_counts(db_path).get("done", 0) == paused_at, "tagging went on while paused"
        status = run_tagd("-c", cfg, "status")
        assert "daemon:    running" in status.stdout and "paused" in status.stdout
        assert "provider:  CPUExecutionProvider" in status.stdout
        assert "watching:  " + str(gallery) + " [inotify]" in status.stdout
        results.append(run_tagd("-c", cfg, "resume"))
        wait_for(lambda: db_counts(db_path).get("failed", 0) == 1)
        failed = run_tagd("-c", cfg, "jobs", "--failed")
        assert "broken.png" in failed.stdout and "not a recognised image" in failed.stdout
        retry = run_tagd("-c", cfg, "jobs", "retry")
        assert "1 failed job queued again" in retry.stdout
        results.extend([failed, retry])
        while db_counts(db_path).get("done", 0) < N_IMAGES + 3:
            results.append(run_tagd("-c", cfg, "status"))
        for r in results:
            assert r.returncode == 0, r.stderr
            assert "locked" not in r.stderr and "Traceback" not in r.stderr
        wait_for(lambda: db_counts(db_path) == {"done": N_IMAGES + 3, "failed": 1})
        # The search ranking cache takes in what the daemon tagged.
        wait_for(lambda: rank_cache_seq(db_path) == max_change_seq(db_path))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert not Path(f"{db_path}.query.sock").exists()
    status = run_tagd("-c", str(daemon_config), "status")
    assert "daemon:    stopped cleanly (pid" in status.stdout and "unhealthy" not in status.stdout
    assert "watching:" not in status.stdout  # watchers are listed only while a daemon runs
    assert "last error:" in status.stdout and "broken.png" in status.stdout


@pytest.mark.slow
def test_daemon_pushes_new_tags_to_hydrus(
    tmp_path: Path, gallery: Path, probe_model: Path, notify_socket: socket.socket
) -> None:
    import hashlib

    from hydrus_server import TAGD_KEY, HydrusServer, HydrusState

    red = save(gallery / "red.png", (255, 0, 0), size=(300, 100))
    sha = hashlib.sha256(red.read_bytes()).hexdigest()
    state = HydrusState(access_key="c" * 64)
    state.add_file(sha)
    (tmp_path / "key").write_text("c" * 64)
    with HydrusServer(state) as server:
        config = write_config(
            tmp_path / "config.yaml",
            {
                "database": str(tmp_path / "state" / "tagd.db"),
                "watch": [{"path": str(gallery)}],
                "models": [{"name": "probe", "path": str(probe_model)}],
                "inference": {"device": "cpu", "threads": 1},
                "hydrus": {
                    "enabled": True,
                    "url": server.url,
                    "access_key_file": str(tmp_path / "key"),
                    "interval": 10,
                },
            },
        )
        proc = start(config, notify_socket, tmp_path / "daemon.log")
        try:
            wait_for(lambda: "red" in state.tags(sha, TAGD_KEY), timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert {"red", "rating:general", "character:crimson knight"} <= state.tags(sha, TAGD_KEY)
    assert "c" * 64 not in (tmp_path / "daemon.log").read_text()


def taggings_by_model(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(
            conn.execute(
                "SELECT m.name, count(*) FROM taggings t JOIN models m ON m.id = t.model_id "
                "GROUP BY m.name"
            ).fetchall()
        )
    finally:
        conn.close()


def test_sighup_reload_adds_a_root_and_a_model(
    tmp_path: Path, probe_model: Path, notify_socket: socket.socket
) -> None:
    db_path = tmp_path / "state" / "tagd.db"
    first, second = tmp_path / "first", tmp_path / "second"
    for i in range(2):
        save(first / f"a{i}.png", (40 * i, 90, 200), size=(300, 200))
        save(second / f"b{i}.png", (200, 40 * i, 90), size=(300, 200))
    base = {
        "database": str(db_path),
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu", "batch_size": 2, "threads": 1},
        "daemon": {"settle_seconds": 0.3},
    }
    config = write_config(tmp_path / "config.yaml", {**base, "watch": [{"path": str(first)}]})
    log = tmp_path / "daemon.log"
    proc = start(config, notify_socket, log)
    try:
        wait_message(notify_socket, "READY=1")
        wait_for(lambda: taggings_by_model(db_path) == {"probe": 2})

        # A broken config is refused and the running one kept.
        config.write_text(config.read_text() + "\nwatchh: []\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running configuration" in log.read_text())
        assert proc.poll() is None

        write_config(
            config,
            {
                **base,
                "watch": [{"path": str(first)}, {"path": str(second)}],
                "models": [
                    {"name": "probe", "path": str(probe_model)},
                    {"name": "probe2", "path": str(probe_model)},
                ],
            },
        )
        messages(notify_socket)
        proc.send_signal(signal.SIGHUP)
        seen = wait_message(notify_socket, "READY=1", timeout=60)
        assert any(m.startswith("RELOADING=1") for m in seen), seen
        # The new root is scanned and the new model catches up on every known file.
        wait_for(lambda: taggings_by_model(db_path) == {"probe": 4, "probe2": 4}, timeout=60)
        status = run_tagd("-c", str(config), "status")
        assert str(second) in status.stdout and "probe2" in status.stdout, status.stdout
        # The new root is watched live, by both models.
        save(second / "late.png", (10, 200, 10), size=(300, 200))
        wait_for(lambda: taggings_by_model(db_path) == {"probe": 5, "probe2": 5}, timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


@pytest.mark.slow
def test_a_second_daemon_on_the_same_database_is_refused(
    daemon_config: Path, tmp_path: Path, notify_socket: socket.socket
) -> None:
    proc = start(daemon_config, notify_socket)
    try:
        wait_message(notify_socket, "READY=1")
        second = run_tagd("-c", str(daemon_config), "run")
        assert second.returncode == 1
        assert f"another tagd daemon (pid {proc.pid}) is already running" in second.stderr
        assert "Traceback" not in second.stderr
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # The kernel drops the lock with the process, even on SIGKILL: a new daemon starts.
    again = start(daemon_config, notify_socket)
    try:
        wait_message(notify_socket, "READY=1")
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0
