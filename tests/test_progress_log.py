"""`tagd run` without a terminal logs a "progress:" line every `daemon.progress_log_interval`
while there is work, and none while idle (the journal under systemd stays quiet)."""

from __future__ import annotations

import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest
from conftest import run_tagd, save, wait_for, write_config
from test_daemon import db_counts, messages, notify_socket, start  # noqa: F401

PROGRESS = re.compile(
    r"progress: (\d+) queued, \d+ running, (\d+) done, \d+ failed jobs?; [\d.]+ images/s, eta "
)


@pytest.mark.slow
def test_progress_line_while_busy_and_none_when_idle(
    tmp_path: Path,
    gallery: Path,
    probe_model: Path,
    notify_socket: socket.socket,  # noqa: F811
) -> None:
    rng = random.Random(5)
    for i in range(80):
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        save(gallery / f"{i:03d}.png", color, size=(1200 + i, 900))
    db_path = tmp_path / "state" / "tagd.db"
    config = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(db_path),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu", "batch_size": 1, "threads": 1},
            "daemon": {"settle_seconds": 0.3, "progress_log_interval": 1},
        },
    )
    log = tmp_path / "run.log"
    # Paused, the queue stays busy for as long as the test needs: a fast machine tags the 80
    # files within one progress interval, and a line must be seen before the queue drains.
    assert run_tagd("-c", str(config), "pause").returncode == 0
    proc = start(config, notify_socket, log)
    try:
        try:
            busy = wait_for(lambda: PROGRESS.search(log.read_text()), timeout=60)
        except AssertionError:
            raise AssertionError(
                f"no progress line (daemon exit {proc.poll()}); its log:\n{log.read_text()}"
            ) from None
        assert isinstance(busy, re.Match)
        assert run_tagd("-c", str(config), "resume").returncode == 0
        wait_for(lambda: db_counts(db_path).get("done", 0) == 80, timeout=90)
        # The daemon has seen the empty queue once it publishes a status saying so.
        wait_for(lambda: any("queue=0 running=0" in m for m in messages(notify_socket)), timeout=30)
        idle_from = len(log.read_text())
        statuses = 0
        deadline = time.monotonic() + 30
        while statuses < 3 and time.monotonic() < deadline:
            statuses += sum(m.startswith("STATUS=") for m in messages(notify_socket))
        assert statuses >= 3
        assert "progress:" not in log.read_text()[idle_from:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
