"""Read-side summaries of the index that commands print: counts per model, tag counts, stats,
one file's stored tags (`tagd show`).

Commands format; this module speaks SQL, so a schema change touches one place. Each function
takes an open connection and returns plain values.
"""

from __future__ import annotations

import difflib
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from tagd.names import AS_TEXT, to_db

JOB_STATES = ("queued", "running", "done", "failed")


class UnknownModel(LookupError):
    """A model name the index does not know; its message (with a did-you-mean) is what every
    command prints, so the CLI and the web API translate this one error in one place each."""


def model_id(conn: sqlite3.Connection, name: str) -> int | None:
    """The id of the model `name` in the index, None when it has never tagged here."""
    row = conn.execute("SELECT id FROM models WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def require_model_id(conn: sqlite3.Connection, name: str) -> int:
    """The id of the model `name`; UnknownModel naming the known models when it is missing."""
    found = model_id(conn, name)
    if found is None:
        raise UnknownModel(unknown_model_message(conn, name))
    return found


def unknown_model_message(conn: sqlite3.Connection, name: str) -> str:
    known = [str(r[0]) for r in conn.execute("SELECT name FROM models ORDER BY name")]
    guess = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{guess[0]}'?" if guess else ""
    return f"no model named {name!r} in the index (known: {', '.join(known) or 'none'}){hint}"


def model_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM models").fetchone()[0])


def model_label_namespaces(conn: sqlite3.Connection, name: str) -> dict[str, str]:
    """Tag name → namespace for every output of the model `name` (what it can predict)."""
    return {
        str(n): str(ns)
        for n, ns in conn.execute(
            "SELECT t.name, t.namespace FROM model_tags mt JOIN tags t ON t.id = mt.tag_id "
            "JOIN models m ON m.id = mt.model_id WHERE m.name = ?",
            (name,),
        )
    }


def tagged_file_ids(conn: sqlite3.Connection, name: str) -> set[int]:
    """Files the model `name` has processed."""
    return {
        int(r[0])
        for r in conn.execute(
            "SELECT file_id FROM taggings WHERE model_id = (SELECT id FROM models WHERE name = ?)",
            (name,),
        )
    }


def tagged_count(conn: sqlite3.Connection, name: str) -> int:
    return int(
        conn.execute(
            "SELECT count(*) FROM taggings t JOIN models m ON m.id = t.model_id WHERE m.name = ?",
            (name,),
        ).fetchone()[0]
    )


def models_summary(conn: sqlite3.Connection) -> dict[str, tuple[int | None, int, int]]:
    """Model name → (output count, files tagged, embeddings stored)."""
    return {
        str(name): (n_tags, int(tagged), int(emb))
        for name, n_tags, tagged, emb in conn.execute(
            "SELECT m.name, m.n_tags, "
            "(SELECT count(*) FROM taggings g WHERE g.model_id = m.id), "
            "(SELECT count(*) FROM embeddings e WHERE e.model_id = m.id) "
            "FROM models m ORDER BY m.name"
        )
    }


def first_present_path(conn: sqlite3.Connection, sha256: str) -> str | None:
    """The first live path of the file with this content, for messages and listings."""
    row = conn.execute(
        "SELECT p.path FROM paths p JOIN files f ON f.id = p.file_id "
        "WHERE f.sha256 = ? AND p.missing = 0 ORDER BY p.path LIMIT 1",
        (sha256,),
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class PathToQueue:
    path: str
    size: int
    mtime_ns: int


def paths_to_retag(
    conn: sqlite3.Connection,
    where: str,
    params: Sequence[object],
    *,
    model: int | None,
    include_tagged: bool,
) -> list[PathToQueue]:
    """Live paths of files matching the compiled query `where` (over `files f`), without
    those `model` already processed unless `include_tagged`."""
    untagged = (
        ""
        if include_tagged
        else " AND NOT EXISTS (SELECT 1 FROM taggings t WHERE t.file_id = f.id AND t.model_id = ?)"
    )
    rows = conn.execute(
        "SELECT p.path, p.size, p.mtime_ns FROM files f JOIN paths p ON p.file_id = f.id "
        f"WHERE p.missing = 0 AND ({where}){untagged} ORDER BY p.path",
        [*params, *([] if include_tagged else [-1 if model is None else model])],
    ).fetchall()
    return [PathToQueue(str(p), int(s), int(m)) for p, s, m in rows]


@dataclass(frozen=True)
class TagCount:
    namespace: str
    name: str
    files: int


def tag_counts(
    conn: sqlite3.Connection,
    *,
    prefix: str = "",
    namespace: str | None = None,
    model: int | None = None,
    top: int | None = None,
) -> list[TagCount]:
    """Tags selected for at least one file, most common first (files counted once)."""
    tag_where, tag_params = ["1"], []
    if prefix:
        tag_where.append("t.name >= ? AND t.name < ?")
        tag_params += [prefix, prefix + "\U0010ffff"]
    if namespace:
        tag_where.append("t.namespace = ?")
        tag_params.append(namespace)
    model_sql, model_params = ("", []) if model is None else (" AND s.model_id = ?", [model])
    # One model: each file has at most one row per tag, so an index range count suffices;
    # with several, a file two models selected the tag for is counted once.
    single = model is not None or model_count(conn) <= 1
    counted = "count(*)" if single else "count(DISTINCT s.file_id)"
    sql = (
        f"SELECT namespace, name, n FROM (SELECT t.namespace, t.name, (SELECT {counted} "
        f"FROM scores s WHERE s.tag_id = t.id AND s.selected = 1{model_sql}) AS n "
        f"FROM tags t WHERE {' AND '.join(tag_where)}) WHERE n > 0 "
        "ORDER BY n DESC, namespace, name"
    )
    params: list[object] = [*model_params, *tag_params]
    if top is not None:
        sql += " LIMIT ?"
        params.append(top)
    return [TagCount(str(ns), str(n), int(c)) for ns, n, c in conn.execute(sql, params)]


@dataclass(frozen=True)
class IndexCounts:
    files: int
    paths: int
    missing_paths: int
    tags: int
    jobs: dict[str, int]
    db_bytes: int


def index_counts(conn: sqlite3.Connection, db_path: str) -> IndexCounts:
    """Row counts `tagd stats` prints, and the database's size on disk (WAL included)."""

    def one(sql: str) -> int:
        return int(conn.execute(sql).fetchone()[0])

    jobs = dict(conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
    size = sum(os.path.getsize(p) for p in (db_path, db_path + "-wal") if os.path.exists(p))
    return IndexCounts(
        files=one("SELECT count(*) FROM files"),
        paths=one("SELECT count(*) FROM paths WHERE missing = 0"),
        missing_paths=one("SELECT count(*) FROM paths WHERE missing = 1"),
        tags=one("SELECT count(*) FROM tags"),
        jobs={s: int(jobs.get(s, 0)) for s in JOB_STATES},
        db_bytes=size,
    )


@dataclass(frozen=True)
class FileTags:
    path: str
    sha256: str
    width: int | None
    height: int | None
    models: dict[str, list[tuple[str, str, float, bool]]]


def file_tags(conn: sqlite3.Connection, path: str) -> FileTags | None:
    """Everything stored about the file at `path`: per model, (namespace, tag, score, selected)."""
    row = conn.execute(
        "SELECT f.id, f.sha256, f.width, f.height FROM paths p JOIN files f ON f.id = p.file_id "
        f"WHERE p.path = {AS_TEXT} AND p.missing = 0",
        (to_db(path),),
    ).fetchone()
    if row is None:
        return None
    models: dict[str, list[tuple[str, str, float, bool]]] = {}
    for model, ns, name, score, selected in conn.execute(
        """SELECT m.name, t.namespace, t.name, s.score, s.selected
           FROM scores s JOIN tags t ON t.id = s.tag_id JOIN models m ON m.id = s.model_id
           WHERE s.file_id = ? ORDER BY m.name, s.score DESC""",
        (row[0],),
    ):
        models.setdefault(model, []).append((ns, name, float(score), bool(selected)))
    for (model,) in conn.execute(
        "SELECT m.name FROM taggings t JOIN models m ON m.id = t.model_id WHERE t.file_id = ?",
        (row[0],),
    ):
        models.setdefault(model, [])
    return FileTags(path, row[1], row[2], row[3], models)
