"""What `tagd status` reports: the daemon's published status row plus the queue, as text.

The daemon rewrites the row every few seconds; a stale heartbeat or a dead pid means it is not
running, whatever the row last said.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagd.index import db
from tagd.index import jobs as queue
from tagd.names import for_humans

if TYPE_CHECKING:
    from tagd.index.dberrors import DatabaseTrouble

STATE_KEY = "daemon"
SCAN_KEY = "scan"
LAST_ERROR_KEY = "last_error"
STALE_AFTER_S = 30.0
HEALTH_SIZE = 4096


def health_path(database: str | Path) -> Path:
    return Path(f"{database}.health")


class HealthFile:
    """The daemon's liveness and database trouble, beside the database but outside it.

    When the disk is full the status row cannot be written, yet `tagd status` must say why
    the daemon is not tagging. The file is allocated once at start and then overwritten in
    place, which needs no free space.
    """

    def __init__(self, database: str | Path) -> None:
        self.path = health_path(database)
        self.fd: int | None = None
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            os.posix_fallocate(self.fd, 0, HEALTH_SIZE)
        except OSError:
            pass  # a full disk at start: kept open if it exists, written when possible

    def write(self, pid: int, trouble: DatabaseTrouble, *, stopped: bool = False) -> None:
        if self.fd is None:
            return
        record = {
            "pid": pid,
            "host": socket.gethostname(),
            "time": time.time(),
            "stopped": stopped,
            "database_error": trouble.error,
            "since": trouble.since,
            "retry_in": round(trouble.waiting(), 1),
        }
        data = json.dumps(record).encode()[: HEALTH_SIZE - 1]
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, data.ljust(HEALTH_SIZE - 1) + b"\n", 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def read_health(database: str | Path) -> dict[str, Any]:
    try:
        record = json.loads(health_path(database).read_bytes().strip() or b"{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def daemon_info(conn: sqlite3.Connection) -> dict[str, Any]:
    raw = db.get_state(conn, STATE_KEY)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _alive(info: dict[str, Any], now: float | None = None) -> bool:
    """A fresh heartbeat, and (on this host) a live pid."""
    now = time.time() if now is None else now
    if now - float(info.get("heartbeat", 0)) > STALE_AFTER_S:
        return False
    pid = info.get("pid")
    if info.get("host") == socket.gethostname() and isinstance(pid, int):
        return queue.pid_running(pid)
    return True


def daemon_running(info: dict[str, Any], now: float | None = None) -> bool:
    if not info or info.get("stopped"):
        return False
    return _alive(info, now)


def publish_scan(
    conn: sqlite3.Connection, done: int, total: int, rate: float, **extra: Any
) -> None:
    """What a running `tagd scan` is doing, for `tagd status` (rewritten every few seconds)."""
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "heartbeat": time.time(),
        "done": done,
        "total": total,
        "rate": round(rate, 2),
        **extra,
    }
    with db.write(conn):
        db.set_state(conn, SCAN_KEY, json.dumps(info, sort_keys=True))


def clear_scan(conn: sqlite3.Connection) -> None:
    with db.write(conn):
        db.delete_state(conn, SCAN_KEY)


def scan_running(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """The running scan's published progress, or None (none, or its process is gone)."""
    raw = db.get_state(conn, SCAN_KEY)
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    return info if isinstance(info, dict) and _alive(info) else None


def _daemon_state(info: dict[str, Any]) -> str:
    if daemon_running(info):
        return "running"
    if info.get("stopped") and info.get("clean"):
        return "stopped cleanly"
    if info.get("stopped"):
        return f"stopped (exit code {info.get('exit_code', '?')})"
    if info:
        return "not running (it did not stop cleanly: killed or crashed?)"
    return "not running"


def _eta(left: int, rate: float) -> str:
    from tagd.progress import eta

    return eta(left, rate)


def report(
    conn: sqlite3.Connection,
    roots: list[str] | None = None,
    database: str | Path | None = None,
) -> dict[str, Any]:
    """`roots`: the configured watch roots, so a missing (unmounted) one is shown;
    `database`: its path, to read the health file a daemon keeps when writes fail."""
    info = daemon_info(conn)
    health = read_health(database) if database is not None else {}
    live = dict(health, heartbeat=health.get("time", 0))
    # The status row stops being written when writes fail; the health file goes on.
    trouble = health.get("database_error") if daemon_running(live) else None
    if trouble and not daemon_running(info):
        info = {**info, "pid": health.get("pid"), "heartbeat": live["heartbeat"], "stopped": False}
        info["healthy"] = False
    running = daemon_running(info)
    models = [
        {"name": r[0], "revision": r[1], "tags": r[2], "files": r[3]}
        for r in conn.execute(
            """SELECT m.name, m.revision, m.n_tags,
                      (SELECT count(*) FROM taggings t WHERE t.model_id = m.id)
               FROM models m ORDER BY m.name"""
        )
    ]
    return {
        "daemon": _daemon_state(info),
        "pid": info.get("pid"),
        "healthy": info.get("healthy") if running else None,
        "provider": info.get("provider"),
        "watchers": info.get("watchers", {}) if running else {},
        "rate": info.get("rate") if running else None,
        "missing_roots": [r for r in roots or () if not os.path.isdir(r)],
        "scan": scan_running(conn),
        "paused": queue.is_paused(conn),
        "jobs": queue.counts(conn),
        "waiting_to_retry": queue.waiting(conn),
        "models": models,
        "last_error": db.get_state(conn, LAST_ERROR_KEY),
        "database_error": trouble,
        "database_error_since": health.get("since") if trouble else None,
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
    unhealthy = ", unhealthy" if r["daemon"] == "running" and not r["healthy"] else ""
    lines = [
        f"daemon:    {r['daemon']}"
        + (f" (pid {r['pid']}{unhealthy})" if r["pid"] else "")
        + (", paused (tagd resume)" if r["paused"] else ""),
        f"jobs:      {j['queued']} queued ({r['waiting_to_retry']} waiting to retry), "
        f"{j['running']} running, {j['done']} done, {j['failed']} failed",
        f"provider:  {r['provider'] or 'unknown (daemon not started yet)'}",
    ]
    for m in r["models"]:
        lines.append(f"model:     {m['name']} ({m['revision']}): {m['files']} files tagged")
    if r.get("rate") is not None:
        backlog = j["queued"]
        lines.insert(
            2,
            f"rate:      {float(r['rate']):.1f} images/s over the last minute, backlog "
            f"{backlog}, eta {_eta(backlog, float(r['rate']))}",
        )
    scan = r.get("scan")
    if scan:
        left = max(0, int(scan["total"]) - int(scan["done"]))
        lines.insert(
            1,
            f"scan:      running (pid {scan['pid']}): {scan['done']}/{scan['total']} images, "
            f"{float(scan['rate']):.1f} images/s, eta {_eta(left, float(scan['rate']))}",
        )
    for path, mode in sorted(r["watchers"].items()):
        lines.append(f"watching:  {for_humans(path)} [{mode}]")
    for path in r.get("missing_roots", []):
        lines.append(f"root:      {for_humans(path)} is missing (unmounted?); waiting for it")
    if r.get("database_error"):
        since = time.strftime("%H:%M:%S", time.localtime(r["database_error_since"] or 0))
        lines.append(f"database:  not tagging since {since}, retrying: {r['database_error']}")
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
        lines.append(f"last error: {for_humans(r['last_error'])}")
    return "\n".join(lines)
