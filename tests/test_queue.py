"""The SQLite job queue on a real database file: dedupe, claims, leases, retries."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tagd.index import db
from tagd.index import jobs as queue


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    return db.connect(tmp_path / "q.db")


def _enqueue(conn: sqlite3.Connection, path: str, size: int = 1, mtime: int = 1, **kw) -> bool:
    with db.write(conn):
        return queue.enqueue(conn, path, size, mtime, **kw)


def test_schema_and_pragmas(conn: sqlite3.Connection, tmp_path: Path) -> None:
    assert db.schema_version(conn) == db.migrations()[-1][0]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    again = db.connect(tmp_path / "q.db")
    assert db.schema_version(again) == db.schema_version(conn)
    plan = " ".join(
        r[3]
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT file_id FROM scores WHERE tag_id = 5 AND selected = 1"
        )
    )
    assert "scores_by_tag" in plan and "SEARCH" in plan


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    raw = sqlite3.connect(tmp_path / "new.db")
    raw.execute("PRAGMA user_version = 999")
    raw.close()
    with pytest.raises(db.DatabaseError, match="newer than this tagd"):
        db.connect(tmp_path / "new.db")


def test_enqueue_is_idempotent_until_the_file_changes(conn: sqlite3.Connection) -> None:
    assert _enqueue(conn, "/g/a.jpg")
    assert not _enqueue(conn, "/g/a.jpg")
    (job,) = queue.claim(conn, "w1", 10)
    with db.write(conn):
        assert queue.complete(conn, job, "w1")
    assert not _enqueue(conn, "/g/a.jpg")
    assert _enqueue(conn, "/g/a.jpg", mtime=2)
    assert queue.counts(conn)["queued"] == 1
    assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_claim_order_priority_then_oldest(conn: sqlite3.Connection) -> None:
    for name in ("a", "b", "c", "d"):
        _enqueue(conn, f"/g/{name}")
    _enqueue(conn, "/g/c", priority=5)
    first = queue.claim(conn, "w", 2)
    assert [j.path for j in first] == ["/g/c", "/g/a"]
    second = queue.claim(conn, "other", 10)
    assert [j.path for j in second] == ["/g/b", "/g/d"]
    assert queue.claim(conn, "third", 10) == []


def test_item04_expired_lease_charges_only_the_job_being_decoded(
    conn: sqlite3.Connection,
) -> None:
    """Its owner died three times while decoding /g/a: /g/a fails, /g/b (leased beside it,
    waiting its turn) goes back every time without a charge."""
    _enqueue(conn, "/g/a")
    _enqueue(conn, "/g/b")
    for attempt in range(1, 4):
        jobs = {
            j.path: j for j in queue.claim(conn, f"dead{attempt}", 2, lease_s=-1, max_attempts=3)
        }
        assert jobs["/g/a"].attempts == attempt and jobs["/g/b"].attempts == 1
        queue.mark_decoding(conn, jobs["/g/a"].id, f"dead{attempt}", True)
    (job,) = queue.claim(conn, "w", 2, max_attempts=3)
    assert job.path == "/g/b" and job.attempts == 1
    state, error = conn.execute("SELECT state, error FROM jobs WHERE path = '/g/a'").fetchone()
    assert state == "failed" and "tagd stopped 3 times while decoding this file" in error


def test_item04_decoding_mark_is_cleared_by_every_verdict(conn: sqlite3.Connection) -> None:
    for name in ("a", "b", "c"):
        _enqueue(conn, f"/g/{name}")
    jobs = queue.claim(conn, "w", 3)
    for job in jobs:
        queue.mark_decoding(conn, job.id, "w", True)
    queue.mark_decoding(conn, jobs[0].id, "other", False)  # not its lease: no effect
    with db.write(conn):
        queue.complete(conn, jobs[0], "w")
        queue.fail(conn, jobs[1], "w", "bad", transient=False)
    queue.release(conn, "w")
    assert (
        conn.execute("SELECT count(*) FROM jobs WHERE decoding_since IS NOT NULL").fetchone()[0]
        == 0
    )


def test_completion_needs_the_lease(conn: sqlite3.Connection) -> None:
    _enqueue(conn, "/g/a")
    (stale,) = queue.claim(conn, "slow", 1, lease_s=-1)
    (fresh,) = queue.claim(conn, "fast", 1)
    with db.write(conn):
        assert not queue.complete(conn, stale, "slow")
        assert queue.complete(conn, fresh, "fast")


def test_transient_failure_backs_off_then_fails(conn: sqlite3.Connection) -> None:
    _enqueue(conn, "/g/a")
    (job,) = queue.claim(conn, "w", 1)
    with db.write(conn):
        assert queue.fail(conn, job, "w", "truncated", transient=True) == "queued"
    not_before = conn.execute("SELECT not_before FROM jobs").fetchone()[0]
    assert not_before > time.time() + queue.BACKOFF_BASE_S - 5
    assert queue.claim(conn, "w", 1) == []
    assert queue.waiting(conn) == 1
    conn.execute("UPDATE jobs SET not_before = 0, attempts = ?", (queue.DEFAULT_MAX_ATTEMPTS - 1,))
    (job,) = queue.claim(conn, "w", 1)
    with db.write(conn):
        assert queue.fail(conn, job, "w", "still truncated", transient=True) == "failed"
    assert queue.counts(conn)["failed"] == 1
    assert queue.retry_failed(conn) == 1
    assert queue.claim(conn, "w", 1)[0].attempts == 1


def test_release_hands_jobs_back_without_counting(conn: sqlite3.Connection) -> None:
    _enqueue(conn, "/g/a")
    _enqueue(conn, "/g/b")
    claimed = queue.claim(conn, "w", 2)
    assert queue.release(conn, "w") == 2
    again = queue.claim(conn, "w2", 2)
    assert [j.attempts for j in again] == [1, 1]
    assert {j.id for j in again} == {j.id for j in claimed}


def test_lower_numbered_migration_landing_late_is_applied(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "m.db")
    versions = [v for v, _, _ in db.migrations()]
    assert db.applied(conn) == set(versions)
    late = versions[1]
    conn.execute("DELETE FROM state WHERE key = ?", (f"migration.{late:04d}",))
    name = next(n for v, n, _ in db.migrations() if v == late)
    sql = next(q for v, _, q in db.migrations() if v == late)
    for statement in db._split_sql(sql):
        table = statement.split()[2] if statement.upper().startswith("CREATE TABLE") else None
        if table:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()
    again = db.connect(tmp_path / "m.db")
    assert late in db.applied(again), name
    assert db.schema_version(again) == versions[-1]


def test_concurrent_first_opens_do_not_lock(tmp_path: Path) -> None:
    import threading

    errors: list[BaseException] = []

    def open_db() -> None:
        try:
            db.connect(tmp_path / "race.db").close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_db) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.applied(db.connect(tmp_path / "race.db")) == {v for v, _, _ in db.migrations()}
