"""Sidecar files tagd wrote (`sidecars`): the hash of each, so a sidecar someone else wrote
or edited is never replaced unless asked."""

from __future__ import annotations

import sqlite3
import time

from tagd.names import AS_TEXT, to_db


def written_sha(conn: sqlite3.Connection, path: str) -> str | None:
    """The SHA-256 of what tagd last wrote at `path`, None if it never wrote there."""
    row = conn.execute(
        f"SELECT content_sha FROM sidecars WHERE path = {AS_TEXT}", (to_db(path),)
    ).fetchone()
    return None if row is None else str(row[0])


def record_written(conn: sqlite3.Connection, path: str, content_sha: str) -> None:
    conn.execute(
        f"INSERT OR REPLACE INTO sidecars(path, content_sha, written_at) VALUES ({AS_TEXT}, ?, ?)",
        (to_db(path), content_sha, time.time()),
    )
