"""Run a parsed query against the index. User text only ever reaches SQL as parameters.

A tag term matches a file when any model selected that tag for it (each model's own
thresholds were applied when the scores were stored or reindexed).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from tagd.query import And, Node, Not, Tag


@dataclass
class Compiled:
    sql: str
    params: list[object] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    path: str
    sha256: str
    tags: dict[str, float]


def _tag_subquery(term: Tag) -> tuple[str, list[object]]:
    sql = (
        "SELECT s.file_id FROM scores s JOIN tags t ON t.id = s.tag_id "
        "WHERE t.name = ? AND s.selected = 1"
    )
    params: list[object] = [term.name]
    if term.namespace is not None:
        sql += " AND t.namespace = ?"
        params.append(term.namespace)
    return sql, params


def compile_where(node: Node) -> Compiled:
    """A boolean SQL expression over the alias `f` (files)."""
    if isinstance(node, Tag):
        sub, params = _tag_subquery(node)
        return Compiled(f"f.id IN ({sub})", params)
    if isinstance(node, Not):
        inner = compile_where(node.term)
        return Compiled(f"NOT ({inner.sql})", inner.params)
    parts = [compile_where(t) for t in node.terms]
    return Compiled(" AND ".join(f"({p.sql})" for p in parts), [x for p in parts for x in p.params])


def positive_tags(node: Node) -> list[Tag]:
    if isinstance(node, Tag):
        return [node]
    if isinstance(node, And):
        return [t for term in node.terms for t in positive_tags(term)]
    return []


def search(conn: sqlite3.Connection, node: Node, *, limit: int | None = None) -> list[Hit]:
    where = compile_where(node)
    sql = (
        "SELECT p.path, f.id, f.sha256 FROM files f JOIN paths p ON p.file_id = f.id "
        f"WHERE p.missing = 0 AND ({where.sql}) ORDER BY p.path"
    )
    params = list(where.params)
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    rows = conn.execute(sql, params).fetchall()
    wanted = positive_tags(node)
    hits = []
    for path, file_id, sha in rows:
        hits.append(Hit(path, sha, matched_scores(conn, file_id, wanted)))
    return hits


def matched_scores(conn: sqlite3.Connection, file_id: int, terms: list[Tag]) -> dict[str, float]:
    """The best selected score of each matched tag, keyed `namespace:name`."""
    out: dict[str, float] = {}
    for term in terms:
        sub, params = _tag_subquery(term)
        sql = sub.replace("SELECT s.file_id", "SELECT t.namespace, t.name, max(s.score)", 1)
        row = conn.execute(
            sql + " AND s.file_id = ? GROUP BY t.id ORDER BY 3 DESC", [*params, file_id]
        ).fetchone()
        if row is not None:
            out[f"{row[0]}:{row[1]}"] = float(row[2])
    return out


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
        "WHERE p.path = ? AND p.missing = 0",
        (path,),
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
