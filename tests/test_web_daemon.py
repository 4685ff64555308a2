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
