"""Imported Danbooru aliases and implications (`tag_rules`, migration 0012). Parsing the
files and merging with the config's rules is tagging's (tagging/tagrules.py)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from tagd.index import db


def save(
    conn: sqlite3.Connection,
    kind: str,
    pairs: Sequence[tuple[str, str]],
    source: str,
    *,
    replace_all: bool,
) -> None:
    """Store (antecedent, consequent) rules of `kind` in one transaction; with `replace_all`,
    earlier imports of this kind go first."""
    now = time.time()
    with db.write(conn):
        if replace_all:
            conn.execute("DELETE FROM tag_rules WHERE kind = ?", (kind,))
        if kind == "alias":
            # One target per antecedent: a newer import replaces the older alias.
            conn.executemany(
                "DELETE FROM tag_rules WHERE kind = 'alias' AND antecedent = ?",
                [(a,) for a, _ in pairs],
            )
        conn.executemany(
            """INSERT OR REPLACE INTO tag_rules(kind, antecedent, consequent, source, imported_at)
               VALUES (?, ?, ?, ?, ?)""",
            [(kind, a, c, source, now) for a, c in pairs],
        )


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Rules stored per kind."""
    rows = conn.execute("SELECT kind, count(*) FROM tag_rules GROUP BY kind").fetchall()
    return {str(k): int(n) for k, n in rows}


def all_rules(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """Every stored rule as (kind, antecedent, consequent); none when the table cannot be read
    (a read-only open of a database older than migration 0012)."""
    try:
        rows = conn.execute("SELECT kind, antecedent, consequent FROM tag_rules").fetchall()
    except sqlite3.OperationalError:
        return []
    return [(str(k), str(a), str(c)) for k, a, c in rows]
