"""The `paths` table's state changes that several stages make (watcher, scanner, pipeline).

Kept apart from store.py, which needs numpy, so `tagd search` (which reaches the scanner's
folder ranges) starts without it."""

from __future__ import annotations

import sqlite3

from tagd.names import AS_TEXT, to_db


def mark_missing(conn: sqlite3.Connection, path: str) -> None:
    """The file at `path` is gone; its tags stay with the content for when it comes back."""
    conn.execute(f"UPDATE paths SET missing = 1 WHERE path = {AS_TEXT}", (to_db(path),))


def mark_missing_under(
    conn: sqlite3.Connection, low: str, high: str, *, seen_before: float | None = None
) -> int:
    """Paths in [low, high) (a folder's range) are gone; with `seen_before`, only those a
    walk that started then did not see again. Returns how many."""
    seen = "" if seen_before is None else " AND (last_seen IS NULL OR last_seen < ?)"
    params: list[object] = [to_db(low), to_db(high)]
    if seen_before is not None:
        params.append(seen_before)
    return conn.execute(
        f"""UPDATE paths SET missing = 1
            WHERE path >= {AS_TEXT} AND path < {AS_TEXT} AND missing = 0{seen}""",
        params,
    ).rowcount
