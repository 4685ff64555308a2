"""The change log of files' scores and embeddings (`score_changes`, migrations 0006-0007).

Caches kept beside the database (the ranking cache, the similarity index) remember the log's
seq they were built at; files logged after it are the ones to read from SQLite instead.
"""

from __future__ import annotations

import sqlite3


def current_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM score_changes").fetchone()[0])


def db_id(conn: sqlite3.Connection) -> str:
    """Identifies this database; a restored or swapped file is another (migration 0006)."""
    row = conn.execute("SELECT value FROM state WHERE key = 'db.id'").fetchone()
    return "" if row is None else str(row[0])


def logged(conn: sqlite3.Connection) -> bool:
    """Whether this database keeps the log (a read-only open may predate migration 0006)."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'score_changes'").fetchone()
    return found is not None


def changed_since(conn: sqlite3.Connection, seq: int, limit: int) -> list[int] | None:
    """Files changed after `seq`, or None when more than `limit` did."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT file_id FROM score_changes WHERE seq > ? LIMIT ?", (seq, limit + 1)
        )
    ]
    return None if len(ids) > limit else ids


def changes_after(conn: sqlite3.Connection, seq: int, limit: int) -> list[tuple[int, int]]:
    """(seq, file id) logged after `seq`, oldest first: a follower's next batch."""
    return [
        (int(s), int(f))
        for s, f in conn.execute(
            "SELECT seq, file_id FROM score_changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
    ]
