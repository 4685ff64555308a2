"""What `tagd status` reports: the daemon's published status row plus the queue, as text.

The daemon rewrites the row every few seconds; a stale heartbeat or a dead pid means it is not
running, whatever the row last said.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from typing import Any

from tagd import db, queue

STATE_KEY = "daemon"
LAST_ERROR_KEY = "last_error"
STALE_AFTER_S = 30.0


def daemon_info(conn: sqlite3.Connection) -> dict[str, Any]:
    raw = db.get_state(conn, STATE_KEY)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def daemon_running(info: dict[str, Any], now: float | None = None) -> bool:
    if not info or info.get("stopped"):
        return False
    now = time.time() if now is None else now
    if now - float(info.get("heartbeat", 0)) > STALE_AFTER_S:
        return False
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return True


def report(conn: sqlite3.Connection) -> dict[str, Any]:
    info = daemon_info(conn)
    models = [
        {"name": r[0], "revision": r[1], "tags": r[2], "files": r[3]}
        for r in conn.execute(
            """SELECT m.name, m.revision, m.n_tags,
                      (SELECT count(*) FROM taggings t WHERE t.model_id = m.id)
               FROM models m ORDER BY m.name"""
        )
    ]
    return {
        "daemon": "running" if daemon_running(info) else "not running",
        "pid": info.get("pid"),
        "healthy": info.get("healthy"),
        "provider": info.get("provider"),
        "watchers": info.get("watchers", {}),
        "paused": queue.is_paused(conn),
        "jobs": queue.counts(conn),
        "waiting_to_retry": queue.waiting(conn),
        "models": models,
        "last_error": db.get_state(conn, LAST_ERROR_KEY),
        "cluster": cluster_info(conn),
    }


def cluster_info(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """What the last cluster coordinator published (tagd/cluster/coordinator.py)."""
    raw = db.get_state(conn, "cluster")
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def format_report(r: dict[str, Any]) -> str:
    j = r["jobs"]
    lines = [
        f"daemon:    {r['daemon']}"
        + (f" (pid {r['pid']}{'' if r['healthy'] else ', unhealthy'})" if r["pid"] else "")
        + (", paused (tagd resume)" if r["paused"] else ""),
        f"jobs:      {j['queued']} queued ({r['waiting_to_retry']} waiting to retry), "
        f"{j['running']} running, {j['done']} done, {j['failed']} failed",
        f"provider:  {r['provider'] or 'unknown (daemon not started yet)'}",
    ]
    for m in r["models"]:
        lines.append(f"model:     {m['name']} ({m['revision']}): {m['files']} files tagged")
    for path, mode in sorted(r["watchers"].items()):
        lines.append(f"watching:  {path} [{mode}]")
    cluster = r.get("cluster")
    if cluster:
        ago = time.time() - float(cluster.get("updated", 0))
        when = "finished" if cluster.get("stopped") else "running"
        lines.append(
            f"cluster:   {cluster.get('address')} ({when}, updated {ago:.0f} s ago), "
            f"{cluster.get('worker_deaths', 0)} worker deaths"
        )
        for w in cluster.get("workers", []):
            gpus = ",".join(w.get("gpus") or []) or "-"
            lines.append(
                f"worker:    {w.get('host')} ({w.get('node')}) pid {w.get('pid')} "
                f"{w.get('device')} gpu {gpus}: {w.get('state')}, {w.get('done')} files, "
                f"{w.get('rate')} img/s"
            )
    if r["last_error"]:
        lines.append(f"last error: {r['last_error']}")
    return "\n".join(lines)
