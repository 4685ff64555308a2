"""Read-side views the web UI shows (as inventory.py is for the commands): an image page's
rows, the grid of an empty query, tags of a page of hits, autocomplete candidates and the
tag counts behind them. Plain values out; tagd/web shapes them into JSON."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from tagd.index import verdicts


def present_paths(conn: sqlite3.Connection, file_id: int) -> list[str]:
    """The file's paths that are not missing, sorted."""
    return [
        str(r[0])
        for r in conn.execute(
            "SELECT path FROM paths WHERE file_id = ? AND missing = 0 ORDER BY path", (file_id,)
        )
    ]


def browse(
    conn: sqlite3.Connection, newest: bool, limit: int, offset: int
) -> list[tuple[str, int, str]]:
    """(path, file id, sha256) of every present image, by path or newest first, read in
    index order (paths.path is unique; paths_mtime, migration 0011) instead of sorting."""
    order = "p.mtime_ns DESC, p.path" if newest else "p.path"
    return [
        (str(r[0]), int(r[1]), str(r[2]))
        for r in conn.execute(
            "SELECT p.path, p.file_id, f.sha256 FROM paths p JOIN files f ON f.id = p.file_id "
            f"WHERE p.missing = 0 ORDER BY {order} LIMIT ? OFFSET ?",
            (limit, offset),
        )
    ]


def dims(conn: sqlite3.Connection, file_ids: list[int]) -> dict[int, tuple[Any, Any]]:
    """File id → (width, height), either None when unknown."""
    return {
        int(r[0]): (r[1], r[2])
        for r in conn.execute(
            "SELECT id, width, height FROM files WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(file_ids),),
        )
    }


def file_row(conn: sqlite3.Connection, file_id: int) -> tuple[int, Any, Any, Any]:
    """(size, width, height, format) of a file known to exist."""
    size, width, height, fmt = conn.execute(
        "SELECT size, width, height, format FROM files WHERE id = ?", (file_id,)
    ).fetchone()
    return int(size), width, height, fmt


def models_of(conn: sqlite3.Connection, file_id: int) -> list[tuple[str, str | None]]:
    """(model name, its settings JSON) of each model that tagged the file, by name."""
    return [
        (str(name), settings)
        for name, settings in conn.execute(
            "SELECT m.name, m.settings FROM taggings g JOIN models m ON m.id = g.model_id "
            "WHERE g.file_id = ? ORDER BY m.name",
            (file_id,),
        )
    ]


def scores_of(conn: sqlite3.Connection, file_id: int) -> list[tuple[str, str, str, float, int]]:
    """(model, namespace, tag, score, selected) of every stored score of the file, by model
    then best score first."""
    return [
        (str(m), ns, name, float(score), sel)
        for m, ns, name, score, sel in conn.execute(
            "SELECT m.name, t.namespace, t.name, s.score, s.selected FROM scores s "
            "JOIN tags t ON t.id = s.tag_id JOIN models m ON m.id = s.model_id "
            "WHERE s.file_id = ? ORDER BY m.name, s.score DESC",
            (file_id,),
        )
    ]


def hits_tags(
    conn: sqlite3.Connection, file_ids: list[int], limit: int
) -> list[tuple[str, str, int]]:
    """(namespace, tag, files) of the effective tags of these files, most files first: model
    selections, and where people gave verdicts, those not overridden plus the accepted ones."""
    from tagd.index import reviews

    if not reviews.in_use(conn):
        rows = conn.execute(
            "SELECT t.namespace, t.name, count(DISTINCT s.file_id) AS n FROM scores s "
            "JOIN tags t ON t.id = s.tag_id WHERE s.file_id IN (SELECT value FROM json_each(?)) "
            "AND s.selected = 1 GROUP BY t.id ORDER BY n DESC, t.namespace, t.name LIMIT ?",
            (json.dumps(file_ids), limit),
        ).fetchall()
        return [(r[0], r[1], int(r[2])) for r in rows]
    rows = conn.execute(
        "WITH ids(id) AS (SELECT value FROM json_each(?)) "
        "SELECT t.namespace, t.name, count(DISTINCT p.f) AS n FROM ("
        "SELECT s.file_id AS f, s.tag_id AS t FROM scores s WHERE s.file_id IN ids "
        f"AND s.selected = 1 AND NOT {verdicts.overridden('s.file_id', 's.tag_id')} "
        "UNION SELECT r.file_id, r.tag_id FROM reviews r WHERE r.file_id IN ids AND r.verdict = 1"
        ") p JOIN tags t ON t.id = p.t GROUP BY t.id ORDER BY n DESC, t.namespace, t.name LIMIT ?",
        (json.dumps(file_ids), limit),
    ).fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def tag_known(conn: sqlite3.Connection, name: str, namespace: str | None) -> bool:
    """Whether the index has a tag `name` (in `namespace`, when given)."""
    sql = "SELECT 1 FROM tags WHERE name = ?" + (" AND namespace = ?" if namespace else "")
    params: list[object] = [name]
    if namespace:
        params.append(namespace)
    return conn.execute(sql + " LIMIT 1", params).fetchone() is not None


def selected_counts(conn: sqlite3.Connection) -> dict[int, int]:
    """Tag id → files any model selected it for (one GROUP BY over scores_by_tag)."""
    return {
        int(t): int(n)
        for t, n in conn.execute(
            "SELECT tag_id, count(*) FROM scores WHERE selected = 1 GROUP BY tag_id"
        )
    }


def selected_count_capped(conn: sqlite3.Connection, tag_id: int, cap: int) -> int:
    """Files the tag is selected for, counting at most `cap`."""
    return int(
        conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM scores WHERE tag_id = ? AND selected = 1 LIMIT ?)",
            (tag_id, cap),
        ).fetchone()[0]
    )


def tag_names(conn: sqlite3.Connection, limit: int | None = None) -> list[str]:
    """Tag names in the index (with duplicates across namespaces), up to `limit`."""
    if limit is None:
        return [str(r[0]) for r in conn.execute("SELECT name FROM tags")]
    return [str(r[0]) for r in conn.execute("SELECT name FROM tags LIMIT ?", (limit,))]


def tags_starting(
    conn: sqlite3.Connection, prefix: str, namespace: str | None, limit: int
) -> list[tuple[int, str, str]]:
    """(id, namespace, name) of up to `limit` tags whose name starts with `prefix` (a glob
    when it holds `*`, `?` or `[`; `?` and `[` match themselves), in `namespace` if given."""
    where: list[str] = []
    params: list[object] = []
    if "*" in prefix or "?" in prefix or "[" in prefix:
        glob = "".join(f"[{c}]" if c in "[?" else c for c in prefix)
        where.append("name GLOB ?")
        params.append(glob if glob.endswith("*") else glob + "*")
    elif prefix:
        where.append("name >= ? AND name < ?")
        params += [prefix, prefix + "\U0010ffff"]
    if namespace:
        where.append("namespace = ?")
        params.append(namespace)
    sql = f"SELECT id, namespace, name FROM tags WHERE {' AND '.join(where) or '1'} LIMIT ?"
    return [
        (int(tid), str(ns), str(name))
        for tid, ns, name in conn.execute(sql, [*params, limit]).fetchall()
    ]
