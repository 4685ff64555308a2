"""Issue #8, "nothing a gallery holds can stop tagd": full disks, locked and broken databases,
unreadable models and hostile queries end in one line and, for the daemon, a wait, never a
traceback or a dead service. Real processes, real SQLite files, a real full filesystem."""

from __future__ import annotations

import errno
import json
import os
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


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="tagd-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "n.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()
    os.unlink(os.path.join(folder, "n.sock"))
    os.rmdir(folder)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem, so "database or disk is full" comes from the kernel."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def status(config: Path) -> dict:
    r = run_tagd("-c", str(config), "status", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode in (1, 2, 3), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.slow
def test_item10_disk_full_daemon_survives(
    tmp_path: Path, gallery: Path, probe_model: Path, small_disk: Path, notify_socket
) -> None:
    for i in range(2):
        save(gallery / f"a{i}.png", (40 * i, 90, 200))
    database = small_disk / "tagd.db"
    config = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(database),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
            "daemon": {"settle_seconds": 0.2},
        },
    )
    assert run_tagd("-c", str(config), "scan").returncode == 0
    log = tmp_path / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    env.pop("WATCHDOG_PID", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tagd", "-c", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        wait_for(lambda: status(config)["daemon"] == "running", timeout=60)
        # An empty WAL, then not a byte left: the next write has nowhere to go.
        conn = sqlite3.connect(database, timeout=10)
        wait_for(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)
        conn.close()
        filler = fill(small_disk)
        for i in range(3):
            save(gallery / f"b{i}.png", (200, 30 * i, 20))

        r = wait_for(
            lambda: (s := status(config))["database_error"] and s["daemon"] == "running" and s
        )
        assert "database or disk is full" in r["database_error"]
        text = run_tagd("-c", str(config), "status").stdout
        assert "database or disk is full" in text and "retrying" in text
        seen: list[str] = []
        wait_for(
            lambda: seen.extend(drain(notify_socket))
            or any("STATUS=" in m and "database or disk is full" in m for m in seen)
        )
        for args in (("jobs", "add", str(gallery / "b0.png")), ("scan", "--no-tag")):
            line = one_line_error(run_tagd("-c", str(config), *args))
            assert "database or disk is full" in line and "free space" in line, line
        assert proc.poll() is None, log.read_text()

        filler.unlink()
        wait_for(
            lambda: (s := status(config))["jobs"]["done"] == 5
            and s["jobs"]["running"] == 0
            and not s["database_error"],
            timeout=60,
        )
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert "database or disk is full" in text
