"""Human review of tags (migration 0011): verdicts stored apart from model scores.

A verdict of +1 makes a tag effective for a file whatever the models said (an accepted
suggestion, or a tag the models missed); -1 makes it never effective. Model rows in `scores`
are never rewritten, so retags and reindexes cannot undo a review, and clearing a verdict
brings the models' decision back. The CLI (`tagd review`) and the web UI write through here.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tagd.index.db import write
from tagd.index.models import tag_id
from tagd.tagtext import NAMESPACES
from tagd.tagtext import with_underscores as normalise_tag

HUMAN = "human"


class ReviewError(Exception):
    """A file or tag the review cannot apply to (one line, names the input)."""


@dataclass(frozen=True)
class Verdict:
    namespace: str
    name: str
    verdict: int
    at: float
    by: str


def available(conn: sqlite3.Connection) -> bool:
    """Whether the reviews table exists (a read-only open may predate migration 0011)."""
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'reviews'").fetchone()
    return found is not None


def in_use(conn: sqlite3.Connection) -> bool:
    """Whether any verdict exists: searches add the review terms only then."""
    if not available(conn):
        return False
    return conn.execute("SELECT 1 FROM reviews LIMIT 1").fetchone() is not None


def judged_files(conn: sqlite3.Connection, limit: int) -> list[int] | None:
    """Ids of the files with any verdict, or None when more than `limit` have one."""
    ids = [
        int(r[0])
        for r in conn.execute("SELECT DISTINCT file_id FROM reviews LIMIT ?", (limit + 1,))
    ]
    return None if len(ids) > limit else ids


def resolve_file(conn: sqlite3.Connection, ref: str) -> tuple[int, str]:
    """(file id, sha256) from an indexed path or a sha256 (full, or a unique prefix of 8+)."""
    if re.fullmatch(r"[0-9a-fA-F]{8,64}", ref):
        rows = conn.execute(
            "SELECT id, sha256 FROM files WHERE sha256 >= ? AND sha256 < ? LIMIT 2",
            (ref.lower(), ref.lower() + "g"),
        ).fetchall()
        if len(rows) == 1:
            return int(rows[0][0]), str(rows[0][1])
        if len(rows) > 1:
            raise ReviewError(f"sha256 prefix {ref} matches several files: give more digits")
    path = os.path.abspath(os.path.expanduser(ref))
    row = conn.execute(
        "SELECT f.id, f.sha256 FROM paths p JOIN files f ON f.id = p.file_id "
        "WHERE p.path = ? AND p.missing = 0",
        (path,),
    ).fetchone()
    if row is None:
        raise ReviewError(f"{path} is not in the index (not scanned yet, or not a known sha256)")
    return int(row[0]), str(row[1])


def split_tag(conn: sqlite3.Connection, text: str) -> tuple[str, str]:
    """(namespace, name) for `text`; an unnamespaced name takes the namespace it already has
    in the index (general first), else general."""
    head, sep, rest = text.partition(":")
    if sep and head.lower() in NAMESPACES and rest:
        namespace, name = head.lower(), normalise_tag(rest)
    else:
        name = normalise_tag(text)
        known = [
            str(r[0]) for r in conn.execute("SELECT namespace FROM tags WHERE name = ?", (name,))
        ]
        namespace = "general" if not known or "general" in known else sorted(known)[0]
    if not name or len(name) > 200 or any(c in name for c in "\n\r\t\0"):
        raise ReviewError(f"bad tag {text!r}: give a tag name such as smile or character:name")
    return namespace, name


def apply(
    conn: sqlite3.Connection,
    file_id: int,
    changes: Iterable[tuple[str, int | None]],
    by: str,
) -> list[tuple[str, str, int | None]]:
    """Set (+1/-1) or clear (None) verdicts on one file in one transaction; returns what was
    applied as (namespace, name, verdict)."""
    if not available(conn):
        raise ReviewError("this database predates reviews: open it once with a writable tagd")
    done = []
    now = time.time()
    with write(conn):
        for text, verdict in changes:
            ns, name = split_tag(conn, text)
            tid = tag_id(conn, ns, name)
            if verdict is None:
                conn.execute("DELETE FROM reviews WHERE file_id = ? AND tag_id = ?", (file_id, tid))
            else:
                conn.execute(
                    "INSERT INTO reviews(file_id, tag_id, verdict, at, by) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(file_id, tag_id) DO UPDATE SET verdict = excluded.verdict, "
                    "at = excluded.at, by = excluded.by",
                    (file_id, tid, verdict, now, by),
                )
            done.append((ns, name, verdict))
    return done


def verdicts(conn: sqlite3.Connection, file_id: int) -> list[Verdict]:
    """A file's verdicts, newest first."""
    if not available(conn):
        return []
    return [
        Verdict(str(ns), str(name), int(v), float(at), str(by))
        for ns, name, v, at, by in conn.execute(
            "SELECT t.namespace, t.name, r.verdict, r.at, r.by FROM reviews r "
            "JOIN tags t ON t.id = r.tag_id WHERE r.file_id = ? ORDER BY r.at DESC, t.name",
            (file_id,),
        )
    ]


def overrides(
    conn: sqlite3.Connection, file_ids: Iterable[int]
) -> dict[int, dict[tuple[str, str], int]]:
    """file id → {(namespace, name): verdict} for the given files (for effective tags)."""
    ids = ",".join(str(int(f)) for f in file_ids)
    if not ids or not available(conn):
        return {}
    out: dict[int, dict[tuple[str, str], int]] = {}
    for fid, ns, name, v in conn.execute(
        "SELECT r.file_id, t.namespace, t.name, r.verdict FROM reviews r "
        f"JOIN tags t ON t.id = r.tag_id WHERE r.file_id IN ({ids})"
    ):
        out.setdefault(int(fid), {})[(str(ns), str(name))] = int(v)
    return out


def reviewed_file_ids(conn: sqlite3.Connection) -> list[int]:
    """Every file with at least one verdict (ground truth for `tagd eval --truth reviews`)."""
    if not available(conn):
        return []
    return [int(r[0]) for r in conn.execute("SELECT DISTINCT file_id FROM reviews")]


def truth(conn: sqlite3.Connection) -> dict[int, list[str]]:
    """Reviewed files' effective tags as `namespace:name`: what a person saw and corrected
    (any model's selection, minus rejected, plus accepted), the ground truth of
    `tagd eval --truth reviews`."""
    ids = reviewed_file_ids(conn)
    if not ids:
        return {}
    marks = ",".join(str(i) for i in ids)
    out: dict[int, set[tuple[str, str]]] = {i: set() for i in ids}
    for fid, ns, name in conn.execute(
        "SELECT DISTINCT s.file_id, t.namespace, t.name FROM scores s "
        f"JOIN tags t ON t.id = s.tag_id WHERE s.selected = 1 AND s.file_id IN ({marks})"
    ):
        out[int(fid)].add((str(ns), str(name)))
    for fid, verdicts in overrides(conn, ids).items():
        for key, v in verdicts.items():
            (out[fid].add if v == 1 else out[fid].discard)(key)
    return {f: sorted(f"{ns}:{n}" for ns, n in tags) for f, tags in out.items()}


def touches(conn: sqlite3.Connection, tag_ids: Iterable[int]) -> bool:
    """Whether any verdict names one of `tag_ids` (the ranking cache cannot bound those)."""
    ids = ",".join(str(int(t)) for t in tag_ids)
    if not ids or not available(conn):
        return False
    sql = f"SELECT 1 FROM reviews WHERE tag_id IN ({ids}) LIMIT 1"
    return conn.execute(sql).fetchone() is not None
