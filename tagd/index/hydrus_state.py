"""What tagd last pushed to each Hydrus tag service, per file (`hydrus_pushed`, migrations
0005 and 0008): the tags tagd added or retracted there, so a later sync never counts them as
a human's, and the digest of the tags it wanted, so unchanged files are skipped."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

from tagd.index import db


@dataclass(frozen=True)
class Pushed:
    """One file's record for one tag service. `known`: Hydrus has the file."""

    known: bool
    desired_hash: str
    pushed: frozenset[str]
    checked_at: float
    retracted: frozenset[str]


_UPSERT = """INSERT INTO hydrus_pushed(file_id, service_key, known, desired_hash, pushed,
                                       checked_at, retracted)
              VALUES (?, ?, ?, ?, ?, ?, ?)
              ON CONFLICT(file_id, service_key) DO UPDATE SET known = excluded.known,
                  desired_hash = excluded.desired_hash, pushed = excluded.pushed,
                  checked_at = excluded.checked_at, retracted = excluded.retracted"""


def previous(conn: sqlite3.Connection, service_key: str, ids: list[int]) -> dict[int, Pushed]:
    """The records of these files for `service_key`; files never synced are absent."""
    rows = conn.execute(
        "SELECT file_id, known, desired_hash, pushed, checked_at, retracted FROM hydrus_pushed "
        "WHERE service_key = ? AND file_id IN (SELECT value FROM json_each(?))",
        (service_key, json.dumps(ids)),
    )
    return {
        int(r[0]): Pushed(
            bool(r[1]),
            str(r[2]),
            frozenset(json.loads(r[3])),
            float(r[4]),
            frozenset(json.loads(r[5])),
        )
        for r in rows
    }


def save(conn: sqlite3.Connection, service_key: str, records: Iterable[tuple[int, Pushed]]) -> None:
    """Replace these files' records in one transaction (each request's outcome is saved as
    soon as Hydrus accepts it)."""
    rows = [
        (
            file_id, service_key, int(p.known), p.desired_hash, json.dumps(sorted(p.pushed)),
            p.checked_at, json.dumps(sorted(p.retracted)),
        )
        for file_id, p in records
    ]  # fmt: skip
    with db.write(conn):
        conn.executemany(_UPSERT, rows)


def known(conn: sqlite3.Connection, file_id: int) -> bool:
    """Whether the last Hydrus sync found this file in Hydrus; False when the table cannot be
    read (a read-only open of a database older than migration 0005)."""
    try:
        row = conn.execute(
            "SELECT max(known) FROM hydrus_pushed WHERE file_id = ?", (file_id,)
        ).fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])
