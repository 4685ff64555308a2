"""The durable job queue in SQLite: enqueue, claim with a lease, complete, fail, retry.

A job is claimed by one owner for a limited lease; a worker that dies leaves an expired lease
that the next claim returns to the queue. Completion is written in the same transaction as
the results, so a crash can neither lose a job nor record it twice.

Attempts: a claim counts one, and every way a job goes back without a verdict takes it back
again, except when the job was being decoded (`decoding_since`) as its owner died: then the
file itself is the likely cause and the attempt stays charged, up to `max_attempts`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass

from tagd.index import db, paths
from tagd.names import AS_TEXT, text_for_db, to_db

DEFAULT_LEASE_S = 300.0
DEFAULT_MAX_ATTEMPTS = 5
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 3600.0
STATES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class Job:
    id: int
    path: str
    size: int | None
    mtime_ns: int | None
    attempts: int
    priority: int
    force_models: tuple[str, ...]


def _job(row: sqlite3.Row) -> Job:
    force = row["force_models"]
    return Job(
        id=row["id"],
        path=row["path"],
        size=row["size"],
        mtime_ns=row["mtime_ns"],
        attempts=row["attempts"],
        priority=row["priority"],
        force_models=tuple(dict.fromkeys(force.split(","))) if force else (),
    )


def enqueue(
    conn: sqlite3.Connection,
    path: str,
    size: int | None,
    mtime_ns: int | None,
    *,
    priority: int = 0,
    force_models: tuple[str, ...] = (),
    requeue: bool = False,
) -> bool:
    """Queue `path` unless an identical job (same size and mtime) is already known.

    A finished or failed job comes back when the file changed, or always with `requeue`.
    Models forced on a job still queued add to those it already has, each named once, so
    repeated `retag --all` runs cannot grow the list. Returns whether the path is now queued
    by this call.
    """
    now = time.time()
    force = _merge_force(conn, path, force_models)
    cur = conn.execute(
        f"""INSERT INTO jobs(path, state, priority, size, mtime_ns, force_models,
                            created_at, updated_at)
           VALUES ({AS_TEXT}, 'queued', ?, ?, ?, ?, ?, ?)
           ON CONFLICT(path) DO UPDATE SET
               state = 'queued', attempts = 0, error = NULL, not_before = 0,
               size = excluded.size, mtime_ns = excluded.mtime_ns,
               priority = max(jobs.priority, excluded.priority),
               force_models = coalesce(excluded.force_models, jobs.force_models),
               updated_at = excluded.updated_at
           WHERE jobs.state != 'running' AND (
               ? OR jobs.size IS NOT excluded.size OR jobs.mtime_ns IS NOT excluded.mtime_ns
               OR (jobs.state = 'queued' AND excluded.priority > jobs.priority)
               OR excluded.force_models IS NOT NULL)""",
        (to_db(path), priority, size, mtime_ns, force, now, now, int(requeue)),
    )
    return cur.rowcount > 0


def _merge_force(conn: sqlite3.Connection, path: str, force_models: tuple[str, ...]) -> str | None:
    """The job's force list after this enqueue: a queued job keeps the models already forced."""
    if not force_models:
        return None
    names = set(force_models)
    row = conn.execute(
        f"SELECT state, force_models FROM jobs WHERE path = {AS_TEXT}", (to_db(path),)
    ).fetchone()
    if row is not None and row[0] == "queued" and row[1]:
        names.update(row[1].split(","))
    return ",".join(sorted(names))


def claim(
    conn: sqlite3.Connection,
    owner: str,
    limit: int,
    *,
    lease_s: float = DEFAULT_LEASE_S,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> list[Job]:
    """Atomically take up to `limit` runnable jobs, highest priority then oldest first."""
    now = time.time()
    with db.write(conn):
        _reap(conn, now, max_attempts)
        rows = conn.execute(
            """UPDATE jobs SET state = 'running', lease_owner = ?, lease_expires = ?,
                   attempts = attempts + 1, updated_at = ?
               WHERE id IN (SELECT id FROM jobs
                            WHERE state = 'queued' AND not_before <= ?
                            ORDER BY priority DESC, id LIMIT ?)
               RETURNING *""",
            (owner, now + lease_s, now, now, limit),
        ).fetchall()
    jobs = [_job(r) for r in rows]
    jobs.sort(key=lambda j: (-j.priority, j.id))
    return jobs


def _reap(conn: sqlite3.Connection, now: float, max_attempts: int) -> None:
    """Expired leases (their owner died or stalled) go back to the queue."""
    _take_back(conn, "lease_expires < ?", (now,), now, max_attempts)


def _take_back(
    conn: sqlite3.Connection,
    where: str,
    params: tuple[object, ...],
    now: float,
    max_attempts: int,
) -> int:
    """Return running jobs matching `where` to the queue (call inside a write transaction).

    A job that was being decoded when its owner went keeps the attempt, and fails once it
    has used `max_attempts`; every other job was only waiting its turn and is not charged.
    """
    failed = conn.execute(
        f"""UPDATE jobs SET state = 'failed', lease_owner = NULL, lease_expires = NULL,
               decoding_since = NULL, updated_at = ?,
               error = 'tagd stopped ' || attempts || ' times while decoding this file (a '
                       || 'crash, a hang or a kill); `tagd jobs retry` queues it again'
           WHERE state = 'running' AND decoding_since IS NOT NULL AND attempts >= ?
             AND {where}""",
        (now, max_attempts, *params),
    ).rowcount
    charged = conn.execute(
        f"""UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL,
               decoding_since = NULL, updated_at = ?
           WHERE state = 'running' AND decoding_since IS NOT NULL AND {where}""",
        (now, *params),
    ).rowcount
    free = conn.execute(
        f"""UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL,
               attempts = max(0, attempts - 1), updated_at = ?
           WHERE state = 'running' AND {where}""",
        (now, *params),
    ).rowcount
    return failed + charged + free


def mark_decoding(conn: sqlite3.Connection, job_id: int, owner: str, decoding: bool) -> None:
    """Record that a worker is (still) decoding this job's file, or no longer is."""
    with db.write(conn):
        conn.execute(
            """UPDATE jobs SET decoding_since = ?
               WHERE id = ? AND lease_owner = ? AND state = 'running'""",
            (time.time() if decoding else None, job_id, owner),
        )


def complete(conn: sqlite3.Connection, job: Job, owner: str) -> bool:
    """Mark done; call inside the transaction that stored the job's results."""
    cur = conn.execute(
        """UPDATE jobs SET state = 'done', error = NULL, lease_owner = NULL,
               lease_expires = NULL, force_models = NULL, decoding_since = NULL, updated_at = ?
           WHERE id = ? AND lease_owner = ? AND state = 'running'""",
        (time.time(), job.id, owner),
    )
    return cur.rowcount > 0


def fail(
    conn: sqlite3.Connection,
    job: Job,
    owner: str,
    reason: str,
    *,
    transient: bool,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff_s: float = BACKOFF_BASE_S,
) -> str:
    """Retry later with exponential backoff if `transient`, else (or when out of tries) fail."""
    now = time.time()
    if transient and job.attempts < max_attempts:
        delay = min(BACKOFF_MAX_S, backoff_s * 2 ** max(0, job.attempts - 1))
        state, not_before = "queued", now + delay
    else:
        state, not_before = "failed", 0.0
    conn.execute(
        """UPDATE jobs SET state = ?, error = ?, not_before = ?, lease_owner = NULL,
               lease_expires = NULL, decoding_since = NULL, updated_at = ?
           WHERE id = ? AND lease_owner = ? AND state = 'running'""",
        (state, text_for_db(reason), not_before, now, job.id, owner),
    )
    return state


def forget_path(conn: sqlite3.Connection, path: str) -> None:
    """The file at `path` went away before it was tagged: its job (unless running) goes."""
    conn.execute(f"DELETE FROM jobs WHERE path = {AS_TEXT} AND state != 'running'", (to_db(path),))


def forget_under(conn: sqlite3.Connection, low: str, high: str) -> None:
    """A folder went away: the jobs of the paths in [low, high) (unless running) go."""
    conn.execute(
        f"""DELETE FROM jobs
            WHERE path >= {AS_TEXT} AND path < {AS_TEXT} AND state != 'running'""",
        (to_db(low), to_db(high)),
    )


def queue_untagged(conn: sqlite3.Connection, model_ids: list[int]) -> int:
    """Queue known, present files that lack a result from any of `model_ids` (one statement)."""
    if not model_ids:
        return 0
    marks = ",".join("?" * len(model_ids))
    now = time.time()
    with db.write(conn):
        return conn.execute(
            f"""INSERT INTO jobs(path, state, size, mtime_ns, created_at, updated_at)
                SELECT p.path, 'queued', p.size, p.mtime_ns, ?, ? FROM paths p
                WHERE p.missing = 0 AND p.file_id IS NOT NULL
                  AND EXISTS (SELECT 1 FROM models m WHERE m.id IN ({marks})
                              AND NOT EXISTS (SELECT 1 FROM taggings t
                                              WHERE t.file_id = p.file_id AND t.model_id = m.id))
                ON CONFLICT(path) DO UPDATE SET
                    state = 'queued', attempts = 0, error = NULL, not_before = 0,
                    updated_at = excluded.updated_at
                WHERE jobs.state = 'done'""",
            [now, now, *model_ids],
        ).rowcount


def drop(conn: sqlite3.Connection, job: Job, owner: str) -> None:
    """Remove a job whose file no longer exists."""
    conn.execute("DELETE FROM jobs WHERE id = ? AND lease_owner = ?", (job.id, owner))


def release(conn: sqlite3.Connection, owner: str, job_ids: list[int] | None = None) -> int:
    """Hand unfinished jobs back (a clean shutdown); the attempt does not count."""
    with db.write(conn):
        sql = """UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL,
                     attempts = max(0, attempts - 1), decoding_since = NULL, updated_at = ?
                 WHERE state = 'running' AND lease_owner = ?"""
        params: list[object] = [time.time(), owner]
        if job_ids is not None:
            sql += f" AND id IN ({','.join('?' * len(job_ids))})"
            params.extend(job_ids)
        return conn.execute(sql, params).rowcount


def retry_failed(conn: sqlite3.Connection, paths: list[str] | None = None) -> int:
    """Queue failed jobs again with a fresh attempt count (all of them, or those `paths`)."""
    sql = """UPDATE jobs SET state = 'queued', attempts = 0, error = NULL, not_before = 0,
                 updated_at = ? WHERE state = 'failed'"""
    with db.write(conn):
        if paths is None:
            return conn.execute(sql, (time.time(),)).rowcount
        return sum(
            conn.execute(sql + f" AND path = {AS_TEXT}", (time.time(), to_db(p))).rowcount
            for p in paths
        )


def heartbeat(conn: sqlite3.Connection, owner: str, lease_s: float) -> int:
    """Extend every lease `owner` holds: its worker is alive, however long the batch takes."""
    with db.write(conn):
        return conn.execute(
            "UPDATE jobs SET lease_expires = ? WHERE lease_owner = ? AND state = 'running'",
            (time.time() + lease_s, owner),
        ).rowcount


def owner_pid(owner: str, host: str) -> int | None:
    """The pid in a `host:pid:start` lease owner when it was taken on `host`."""
    parts = owner.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with
    the pid it names one process for the machine's uptime, so a reused pid is not taken for
    the lease's owner. None where the process does not exist or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def pid_running(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one owned by another user too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def owner_alive(owner: str, host: str) -> bool:
    """Whether the process named by a lease owner taken on `host` still runs (owners from
    other hosts cannot be checked and count as alive: their lease expiry covers them)."""
    pid = owner_pid(owner, host)
    if pid is None:
        return True
    if not pid_running(pid):
        return False
    start = process_start(pid)
    if start is None:
        return not os.path.isdir("/proc/self")
    return start == owner.rsplit(":", 1)[1]


def reap_orphans(
    conn: sqlite3.Connection, me: str, host: str, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> int:
    """Return jobs leased by dead processes on this host to the queue at once, without
    waiting out their lease (a daemon or `tagd scan` killed with SIGKILL). Only a job that
    was being decoded is charged the attempt (see `_take_back`)."""
    owners = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT lease_owner FROM jobs WHERE state = 'running' AND lease_owner != ?",
            (me,),
        )
    ]
    dead = [o for o in owners if o is not None and not owner_alive(o, host)]
    if not dead:
        return 0
    now = time.time()
    with db.write(conn):
        return sum(_take_back(conn, "lease_owner = ?", (o,), now, max_attempts) for o in dead)


def listing(
    conn: sqlite3.Connection, state: str | None = None, limit: int = 50
) -> list[sqlite3.Row]:
    """Jobs in the order the worker takes them (failed: most recent first), at most `limit`."""
    if state == "failed":
        sql = "SELECT * FROM jobs WHERE state = 'failed' ORDER BY updated_at DESC LIMIT ?"
        params: tuple[object, ...] = (limit,)
    elif state is None:
        sql = """SELECT * FROM jobs WHERE state != 'done'
                 ORDER BY state = 'running' DESC, priority DESC, id LIMIT ?"""
        params = (limit,)
    else:
        sql = "SELECT * FROM jobs WHERE state = ? ORDER BY priority DESC, id LIMIT ?"
        params = (state, limit)
    return conn.execute(sql, params).fetchall()


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    out = dict.fromkeys(STATES, 0)
    for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
        out[state] = n
    return out


def waiting(conn: sqlite3.Connection) -> int:
    """Queued jobs held back by a retry delay."""
    return conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND not_before > ?", (time.time(),)
    ).fetchone()[0]


def tagging_now(conn: sqlite3.Connection) -> bool:
    """Whether the daemon has work in hand or ready to claim (not paused): background work
    that must never slow tagging (thumbnails made ahead) waits for this to turn false."""
    if conn.execute("SELECT 1 FROM jobs WHERE state = 'running' LIMIT 1").fetchone():
        return True
    ready = conn.execute(
        "SELECT 1 FROM jobs WHERE state = 'queued' AND not_before <= ? LIMIT 1", (time.time(),)
    ).fetchone()
    return ready is not None and not is_paused(conn)


PAUSED_KEY = "paused"


def is_paused(conn: sqlite3.Connection) -> bool:
    """`tagd pause` is a row in `state`, so it holds across daemon restarts."""
    return db.get_state(conn, PAUSED_KEY) == "1"


def set_paused(conn: sqlite3.Connection, paused: bool) -> None:
    with db.write(conn):
        db.set_state(conn, PAUSED_KEY, "1" if paused else None)


def job_state(conn: sqlite3.Connection, path: str) -> tuple[str, str | None, int] | None:
    """(state, error, attempts) of the job for `path`, or None when it has none."""
    row = conn.execute("SELECT state, error, attempts FROM jobs WHERE path = ?", (path,)).fetchone()
    return None if row is None else (str(row[0]), row[1], int(row[2]))


def move(conn: sqlite3.Connection, src: str, dest: str, at: float) -> None:
    """A file renamed before it was tagged: its waiting job follows it (replacing one already
    waiting at `dest`), so the file is read once. A running job is left to finish."""
    s, d = to_db(src), to_db(dest)
    if conn.execute(
        f"SELECT 1 FROM jobs WHERE path = {AS_TEXT} AND state != 'running'", (s,)
    ).fetchall():
        conn.execute(f"DELETE FROM jobs WHERE path = {AS_TEXT} AND state != 'running'", (d,))
        conn.execute(
            f"""UPDATE OR IGNORE jobs SET path = {AS_TEXT}, updated_at = ?
                WHERE path = {AS_TEXT}""",
            (d, at, s),
        )


def move_under(conn: sqlite3.Connection, low: str, high: str, dest: str, at: float) -> None:
    """A folder (paths in [low, high)) renamed to `dest`: its jobs not running follow it."""
    tail, cut = paths.below_folder_sql(low)
    conn.execute(
        f"""UPDATE OR IGNORE jobs SET path = {AS_TEXT} || {tail}, updated_at = ?
           WHERE path >= {AS_TEXT} AND path < {AS_TEXT} AND state != 'running'""",
        (to_db(dest.rstrip("/") + "/"), cut, at, to_db(low), to_db(high)),
    )


def done_since(conn: sqlite3.Connection, since: float) -> int:
    """Jobs finished after `since` (the recent tagging rate)."""
    return int(
        conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'done' AND updated_at > ?", (since,)
        ).fetchone()[0]
    )
