"""Consistent, honest messages and exit codes across commands (issue #9, honest answers)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import run_tagd, save

from tagd.index.db import connect, set_state, write
from tagd.index.status import clear_scan, publish_scan


def tagd(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return run_tagd("--config", str(cfg), *args)


def test_dupes_help_has_no_doubled_percent() -> None:
    r = run_tagd("dupes", "--help")
    assert r.returncode == 0 and "99% probability" in r.stdout and "%%" not in r.stdout


@pytest.mark.slow
def test_after_a_scan(config_file: Path, gallery: Path, tmp_path: Path) -> None:
    red = save(gallery / "2024" / "red.png", (255, 0, 0), (80, 80))
    save(gallery / "blue.png", (0, 0, 255), (80, 80))
    broken = gallery / "broken.png"
    broken.write_bytes(b"this is not an image " * 40)
    assert tagd(config_file, "scan").returncode == 0

    # show on a failed file: the reason, not "not in the index"
    r = tagd(config_file, "show", str(broken))
    assert r.returncode == 1
    assert r.stderr.startswith(f"tagd: {broken} failed to tag: not a recognised image")
    assert "tagd jobs retry" in r.stderr

    # --sort mtime: no score is invented
    r = tagd(config_file, "search", "red", "--sort", "mtime", "--format", "json")
    assert r.returncode == 0
    assert [h["score"] for h in json.loads(r.stdout)] == [None]
    r = tagd(config_file, "search", "red", "--format", "json")
    assert json.loads(r.stdout)[0]["score"] > 0

    # dir: relative to a root, like path: globs
    r = tagd(config_file, "search", "dir:2024", "red")
    assert (r.returncode, r.stdout.split()) == (0, [str(red)])
    r = tagd(config_file, "search", "dir:2023", "red")
    assert r.returncode == 1

    # tags with no match say so
    r = tagd(config_file, "tags", "character:zzz")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.strip() == "tagd: no tag starts with 'character:zzz'"

    # an unknown model: exit 2 and the known models, in every command
    for args in (
        ("search", "model:prob red"),
        ("tags", "--model", "prob"),
        ("similar", str(red), "--model", "prob"),
        ("dupes", "--model", "prob"),
        ("eval", "--model", "prob", "--truth", "sidecars"),
    ):
        r = tagd(config_file, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip() == (
            "tagd: no model named 'prob' in the index (known: probe); did you mean 'probe'?"
        ), args

    # --explain shows the thresholds reindex applied, not the ones of the last scan
    before = tagd(config_file, "search", "red", "--explain").stdout
    assert "probe general 0.35" in before
    data = yaml.safe_load(config_file.read_text())
    data["models"][0]["thresholds"] = {"general": 0.6}
    config_file.write_text(yaml.safe_dump(data))
    assert tagd(config_file, "reindex", "--no-progress").returncode == 0
    after = tagd(config_file, "search", "red", "--explain").stdout
    assert "probe general 0.6" in after


@pytest.mark.slow
def test_status_and_stats_tell_the_truth(config_file: Path, gallery: Path) -> None:
    save(gallery / "red.png", (255, 0, 0), (80, 80))
    (gallery / "broken.png").write_bytes(b"this is not an image " * 40)
    assert tagd(config_file, "scan").returncode == 0
    db_path = yaml.safe_load(config_file.read_text())["database"]
    status = tagd(config_file, "status")
    assert status.returncode == 0 and "scan:" not in status.stdout  # the scan cleared its row

    # stats and `search untagged` count the same thing (the failed file is untagged)
    untagged = tagd(config_file, "search", "untagged", "--count").stdout.strip()
    stats = json.loads(tagd(config_file, "stats", "--format", "json").stdout)
    assert untagged == "1" and stats["untagged"] == 1

    # a scan in progress (this test process stands in for it: a live pid)
    conn = connect(db_path)
    try:
        publish_scan(conn, 30, 120, 15.0, tagged=29, failed=1)
        status = tagd(config_file, "status").stdout
        assert (
            f"scan:      running (pid {os.getpid()}): 30/120 images, 15.0 images/s, eta 0:00:06"
            in status
        )
        # a daemon that stopped cleanly is not "unhealthy", and lists no watchers
        info = {
            "pid": 1,
            "heartbeat": 0,
            "stopped": True,
            "clean": True,
            "healthy": False,
            "watchers": {str(gallery): "inotify"},
        }
        with write(conn):
            set_state(conn, "daemon", json.dumps(info))
        clear_scan(conn)
    finally:
        conn.close()
    status = tagd(config_file, "status").stdout
    assert "daemon:    stopped cleanly (pid 1)" in status
    assert "unhealthy" not in status and "watching:" not in status and "scan:" not in status

    # a missing root is shown as missing
    gallery.rename(gallery.with_name("unplugged"))
    status = tagd(config_file, "status").stdout
    assert f"root:      {gallery} is missing (unmounted?); waiting for it" in status
