"""`tagd run` with a `web:` section serves the UI in the same process and stops it on SIGTERM;
`tagd serve` runs in the foreground beside it (read-only connections)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import save, wait_for, write_config

pytest.importorskip("starlette")
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


def _tagd(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tagd", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_run_serves_the_ui_and_serve_runs_beside_it(tmp_path: Path, probe_model: Path) -> None:
    g = tmp_path / "g"
    save(g / "red.png", (250, 10, 10))
    port, port2 = _free_port(), _free_port()
    cfg = {
        "database": str(tmp_path / "s" / "tagd.db"),
        "watch": [{"path": str(g)}],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu"},
        "daemon": {"settle_seconds": 0.2},
        "web": {"port": port},
    }
    conf = str(write_config(tmp_path / "c.yaml", cfg))
    run = _tagd("--config", conf, "run")
    serve = None
    try:
        url = f"http://127.0.0.1:{port}/api/search?q=red"
        found = wait_for(lambda: (_get(url) or {}).get("hits"), timeout=60)
        assert [h["path"] for h in found] == [str(g / "red.png")]  # type: ignore[union-attr]
        serve = _tagd("--config", conf, "serve", "--port", str(port2))
        url2 = f"http://127.0.0.1:{port2}/api/search?q=red"
        assert wait_for(lambda: (_get(url2) or {}).get("count") == 1, timeout=30)
        save(g / "red2.png", (240, 10, 10))  # the daemon tags it while both serve
        assert wait_for(lambda: (_get(url2) or {}).get("count") == 2, timeout=60)
    finally:
        for proc in (serve, run):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (serve, run):
            if proc is not None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    assert run.returncode == 0, run.stderr.read().decode() if run.stderr else ""
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_run_makes_thumbnails_ahead_and_a_corrupt_file_does_not_stop_it(
    tmp_path: Path, probe_model: Path
) -> None:
    import os
    import re
    import sqlite3

    from conftest import run_tagd

    g = tmp_path / "g"
    for name, colour in (("red", (250, 10, 10)), ("blue", (10, 10, 250)), ("bad", (9, 9, 9))):
        save(g / f"{name}.png", colour)
    thumbs = tmp_path / "thumbs"
    cfg = {
        "database": str(tmp_path / "s" / "tagd.db"),
        "watch": [{"path": str(g)}],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu"},
        "daemon": {"settle_seconds": 0.2},
    }
    conf = str(write_config(tmp_path / "c.yaml", cfg))
    assert run_tagd("--config", conf, "scan").returncode == 0
    # bad.png turns corrupt behind the index's back: same size and mtime, so it stays indexed.
    bad = g / "bad.png"
    st = bad.stat()
    bad.write_bytes(b"\0" * st.st_size)
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    cfg["web"] = {
        "port": _free_port(),
        "pregenerate_thumbs": True,
        "thumbnail_dir": str(thumbs),
        "thumbnail_size": 96,
    }
    write_config(tmp_path / "c.yaml", cfg)

    def shas() -> dict[str, str]:
        conn = sqlite3.connect(cfg["database"])
        try:
            rows = conn.execute(
                "SELECT p.path, f.sha256 FROM paths p JOIN files f ON f.id = p.file_id"
            ).fetchall()
        finally:
            conn.close()
        return {Path(p).stem: s for p, s in rows}

    def made(sha: str) -> bool:
        return (thumbs / sha[:2] / f"{sha}-96.webp").exists()

    before = shas()
    run = _tagd("--config", conf, "run")
    try:
        assert wait_for(lambda: made(before["red"]) and made(before["blue"]), timeout=60)
        save(g / "green.png", (10, 250, 10))  # tagged by the daemon, then its thumbnail made
        assert wait_for(lambda: "green" in shas() and made(shas()["green"]), timeout=60)
        assert not made(before["bad"]) and run.poll() is None
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
        try:
            run.wait(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
    err = run.stderr.read().decode() if run.stderr else ""
    assert run.returncode == 0, err
    assert re.search(r"catch-up done in [\d.]+ s: 2 made, 0 already there, 1 failed", err), err
    child = int(re.search(r"made ahead in the background \(pid (\d+)\)", err).group(1))  # type: ignore[union-attr]
    assert wait_for(lambda: not Path(f"/proc/{child}").exists(), timeout=10)
