"""`tagd scan`: a missing root, an unreachable Hub, and the progress bar on a terminal (#9)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config
from ptyrun import PtyRun

from tagd.progress import RateMeter, eta

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_missing_root_fails_without_creating_a_database(tmp_path: Path, probe_model: Path) -> None:
    db = tmp_path / "state" / "t.db"
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(db),
            "watch": [str(tmp_path / "typo")],
            "models": [{"name": "probe", "path": str(probe_model)}],
        },
    )
    r = run_tagd("-c", str(cfg), "scan")
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"tagd: watch[0].path: {tmp_path / 'typo'} does not exist; create or mount it, or fix "
        f"the path in {cfg}"
    )
    assert not db.exists() and not db.parent.exists()


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://no-such-host.invalid"])
def test_offline_model_fails_fast_and_others_tag(
    tmp_path: Path, gallery: Path, probe_model: Path, endpoint: str
) -> None:
    save(gallery / "a.png", (200, 0, 0))
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [
                {"name": "local", "path": str(probe_model)},
                {"name": "remote", "repo": "acme/wd-remote-tagger-v3"},
            ],
            "hf_cache": str(tmp_path / "hf"),
            "inference": {"device": "cpu"},
        },
    )
    started = time.monotonic()
    r = run_tagd("-c", str(cfg), "scan", env={"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1"})
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"took {elapsed:.1f} s"
    assert r.returncode == 3, r.stderr
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if "ERROR" in x]
    assert len(errors) == 1
    assert (
        f"model 'remote' (acme/wd-remote-tagger-v3@main): not in the cache, and {endpoint} "
        "cannot be reached" in errors[0]
    )
    assert "tagd models pull" in errors[0]
    summary = next(x for x in r.stderr.splitlines() if "tagged 1, failed 0 in " in x)
    assert "images/s" in summary and "skipped model remote: not in the cache" in summary
    conn = sqlite3.connect(tmp_path / "t.db")
    models = {
        n
        for (n,) in conn.execute("SELECT m.name FROM taggings t JOIN models m ON m.id = t.model_id")
    }
    assert models == {"local"}


def test_only_model_unreachable_is_one_line(tmp_path: Path, gallery: Path) -> None:
    save(gallery / "a.png", (200, 0, 0))
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [{"name": "remote", "repo": "acme/wd-remote-tagger-v3"}],
            "hf_cache": str(tmp_path / "hf"),
        },
    )
    r = run_tagd("-c", str(cfg), "scan", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 3
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("tagd: model 'remote'")


@pytest.mark.slow
def test_progress_bar_under_a_terminal_keeps_log_lines_out(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    for i in range(40):
        save(gallery / f"ok{i:02}.png", (i * 6, 100, 50))
    for i in range(6):
        (gallery / f"bad{i}.png").write_bytes(b"not an image at all " * 50)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu", "batch_size": 2},
        },
    )
    run = PtyRun(["-c", str(cfg), "scan"])
    try:
        assert run.wait() == 0, run.text()
    finally:
        run.close()
    raw = run.text()
    assert "images/s" in raw and "tagging" in raw, raw  # the bar was drawn
    segments = [ANSI.sub("", s) for s in re.split(r"\r\n|\r|\n", raw)]
    warnings = [s for s in segments if "WARNING failed:" in s]
    assert len(warnings) >= 6, raw
    for line in warnings:
        assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING failed: \S+bad\d\.png: .*", line), line
    summary = [s for s in segments if "tagged 40, failed 6 in " in s]
    assert summary and "images/s" in summary[0]


def test_rate_meter_and_eta() -> None:
    meter = RateMeter(window_s=60)
    assert meter.add(0, now=0.0) == 0.0
    assert meter.add(100, now=10.0) == 10.0
    assert meter.add(400, now=70.0) == pytest.approx(300 / 60)  # the first sample left the window
    assert meter.add(5, now=71.0) == 0.0  # the count went down: start over
    assert eta(3600, 2.0) == "0:30:00" and eta(10, 0.0) == "-"


@pytest.mark.slow
def test_run_on_a_terminal_shows_a_live_status_line(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    for i in range(5):
        save(gallery / f"ok{i}.png", (i * 40, 100, 50))
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
        },
    )
    run = PtyRun(["-c", str(cfg), "run"])
    try:
        run.expect("tagd run", timeout=60)
        run.expect("images/s", timeout=30)
        run.expect("0 queued", timeout=60)
        status = run_tagd("-c", str(cfg), "status").stdout
        assert "rate:      " in status and "images/s over the last minute, backlog 0" in status
        os.killpg(run.proc.pid, signal.SIGTERM)
        assert run.wait() == 0
    finally:
        run.close()
    lines = [ANSI.sub("", s) for s in re.split(r"\r\n|\r|\n", run.text())]
    assert any(re.search(r"INFO tagd running: 1 root, models probe", x) for x in lines)
