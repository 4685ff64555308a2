"""The web UI's reads (and its few writes) against the index; route handlers hold no SQL.

Tag counts for autocomplete and the sidebar come from one GROUP BY over `scores_by_tag`,
kept in memory and refreshed in the background when the change log moves, so a keystroke
never counts a million rows.
"""

from __future__ import annotations

import difflib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tagd.index import changes
from tagd.index import reviews as review
from tagd.search.query import NAMESPACES, Node, Tag, walk

SHA_RE = r"[0-9a-f]{64}"


@dataclass
class FileInfo:
    file_id: int
    sha256: str
    size: int
    width: int | None
    height: int | None
    format: str | None
    paths: list[str]
    models: dict[str, list[dict[str, Any]]]
    thresholds: dict[str, dict[str, float]]
    reviews: list[dict[str, Any]]
    effective: list[dict[str, Any]] = field(default_factory=list)


def file_by_sha(conn: sqlite3.Connection, sha: str) -> tuple[int, list[str]] | None:
    """(file id, its present paths) of an indexed file with at least one present path."""
    row = conn.execute("SELECT id FROM files WHERE sha256 = ?", (sha,)).fetchone()
    if row is None:
        return None
    paths = [
        str(r[0])
        for r in conn.execute(
            "SELECT path FROM paths WHERE file_id = ? AND missing = 0 ORDER BY path", (row[0],)
        )
    ]
    return (int(row[0]), paths) if paths else None


def browse(
    conn: sqlite3.Connection, newest: bool, limit: int, offset: int
) -> list[tuple[str, int, str]]:
    """(path, file id, sha256) of every present image, by path or newest first: the grid of
    an empty query, read in index order (paths.path is unique; paths_mtime, migration 0011)
    instead of sorting every row."""
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
    return {
        int(r[0]): (r[1], r[2])
        for r in conn.execute(
            "SELECT id, width, height FROM files WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(file_ids),),
        )
    }


def _thresholds(settings: str | None) -> dict[str, float]:
    try:
        th = json.loads(settings or "{}").get("thresholds", {})
    except (ValueError, AttributeError):
        th = {}
    return {k: float(v) for k, v in th.items() if isinstance(v, int | float)}


def file_info(conn: sqlite3.Connection, sha: str) -> FileInfo | None:
    """Metadata, every stored score per model (with its selection), verdicts, effective tags."""
    found = file_by_sha(conn, sha)
    if found is None:
        return None
    fid, paths = found
    size, width, height, fmt = conn.execute(
        "SELECT size, width, height, format FROM files WHERE id = ?", (fid,)
    ).fetchone()
    models: dict[str, list[dict[str, Any]]] = {}
    thresholds: dict[str, dict[str, float]] = {}
    for name, settings in conn.execute(
        "SELECT m.name, m.settings FROM taggings g JOIN models m ON m.id = g.model_id "
        "WHERE g.file_id = ? ORDER BY m.name",
        (fid,),
    ):
        models[str(name)] = []
        thresholds[str(name)] = _thresholds(settings)
    for model, ns, name, score, sel in conn.execute(
        "SELECT m.name, t.namespace, t.name, s.score, s.selected FROM scores s "
        "JOIN tags t ON t.id = s.tag_id JOIN models m ON m.id = s.model_id "
        "WHERE s.file_id = ? ORDER BY m.name, s.score DESC",
        (fid,),
    ):
        models.setdefault(str(model), []).append(
            {"namespace": ns, "tag": name, "score": round(float(score), 4), "selected": bool(sel)}
        )
    verdicts = review.verdicts(conn, fid)
    vmap = {(v.namespace, v.name): v.verdict for v in verdicts}
    eff: dict[tuple[str, str], dict[str, Any]] = {}
    for rows in models.values():
        for r in rows:
            key = (r["namespace"], r["tag"])
            if r["selected"] and vmap.get(key) != -1:
                best = eff.get(key)
                if best is None or best["score"] < r["score"]:
                    eff[key] = {"namespace": key[0], "tag": key[1], "score": r["score"]}
    for (ns, name), v in vmap.items():
        if v == 1:
            eff[(ns, name)] = {"namespace": ns, "tag": name, "score": 1.0, "human": True}
    return FileInfo(
        fid,
        sha,
        int(size),
        width,
        height,
        fmt,
        paths,
        models,
        thresholds,
        [
            {"namespace": v.namespace, "tag": v.name, "verdict": v.verdict, "by": v.by, "at": v.at}
            for v in verdicts
        ],
        sorted(eff.values(), key=lambda e: (-e["score"], e["namespace"], e["tag"])),
    )


def hits_tags(conn: sqlite3.Connection, file_ids: list[int], limit: int = 60) -> list[dict]:
    """The effective tags of these files (a page of results) with how many carry each:
    model selections, and with human verdicts those not overridden plus accepted ones."""
    if not file_ids:
        return []
    from tagd.index import reviews

    if not reviews.in_use(conn):
        rows = conn.execute(
            "SELECT t.namespace, t.name, count(DISTINCT s.file_id) AS n FROM scores s "
            "JOIN tags t ON t.id = s.tag_id WHERE s.file_id IN (SELECT value FROM json_each(?)) "
            "AND s.selected = 1 GROUP BY t.id ORDER BY n DESC, t.namespace, t.name LIMIT ?",
            (json.dumps(file_ids), limit),
        ).fetchall()
        return [{"namespace": r[0], "tag": r[1], "count": int(r[2])} for r in rows]
    from tagd.search import verdicts

    rows = conn.execute(
        "WITH ids(id) AS (SELECT value FROM json_each(?)) "
        "SELECT t.namespace, t.name, count(DISTINCT p.f) AS n FROM ("
        "SELECT s.file_id AS f, s.tag_id AS t FROM scores s WHERE s.file_id IN ids "
        f"AND s.selected = 1 AND NOT {verdicts.overridden('s.file_id', 's.tag_id')} "
        "UNION SELECT r.file_id, r.tag_id FROM reviews r WHERE r.file_id IN ids AND r.verdict = 1"
        ") p JOIN tags t ON t.id = p.t GROUP BY t.id ORDER BY n DESC, t.namespace, t.name LIMIT ?",
        (json.dumps(file_ids), limit),
    ).fetchall()
    return [{"namespace": r[0], "tag": r[1], "count": int(r[2])} for r in rows]


def tag_names(conn: sqlite3.Connection, term: Tag) -> bool:
    """Whether the index knows a tag this term names."""
    sql = "SELECT 1 FROM tags WHERE name = ?" + (" AND namespace = ?" if term.namespace else "")
    params: list[object] = [term.name]
    if term.namespace:
        params.append(term.namespace)
    return conn.execute(sql + " LIMIT 1", params).fetchone() is not None


def plain_tags(node: Node) -> list[Tag]:
    """Non-wildcard tag terms anywhere in the query (for the unknown-tag check)."""
    return [n for n in walk(node) if isinstance(n, Tag) and not n.wildcard]


class TagCounts:
    """Files per tag (selected by any model), counted in the background; until the first count
    is done, lookups count each candidate up to a cap instead."""

    CAP = 10_000
    REFRESH_S = 600.0

    def __init__(self, connect: Any) -> None:
        self._connect = connect
        self._counts: dict[int, int] | None = None
        self._names: list[str] = []
        self._seq = -1
        self._at = 0.0
        self._lock = threading.Lock()
        self._busy = False

    @property
    def ready(self) -> bool:
        return self._counts is not None

    def refresh_soon(self) -> None:
        """Start a recount in a thread when none runs and the index changed long enough ago."""
        with self._lock:
            if self._busy or (self._counts is not None and time.time() - self._at < 60):
                return
            self._busy = True
        threading.Thread(target=self._recount, name="tagd-web-tagcounts", daemon=True).start()

    def _recount(self) -> None:
        try:
            conn = self._connect()
            try:
                seq = changes.current_seq(conn) if changes.logged(conn) else 0
                if self._counts is not None and seq == self._seq:
                    self._at = time.time()
                    return
                counts = {
                    int(t): int(n)
                    for t, n in conn.execute(
                        "SELECT tag_id, count(*) FROM scores WHERE selected = 1 GROUP BY tag_id"
                    )
                }
                names = sorted({str(r[0]) for r in conn.execute("SELECT name FROM tags")})
            finally:
                conn.close()
            self._counts, self._names, self._seq, self._at = counts, names, seq, time.time()
        except sqlite3.Error:
            pass
        finally:
            self._busy = False

    def count(self, conn: sqlite3.Connection, tag_id: int) -> int:
        if self._counts is not None:
            return self._counts.get(tag_id, 0)
        return int(
            conn.execute(
                "SELECT count(*) FROM (SELECT 1 FROM scores WHERE tag_id = ? AND selected = 1 "
                "LIMIT ?)",
                (tag_id, self.CAP),
            ).fetchone()[0]
        )

    def suggest(self, conn: sqlite3.Connection, name: str) -> list[str]:
        """Close tag names for an unknown one ("did you mean")."""
        names = self._names
        if not names:
            names = [str(r[0]) for r in conn.execute("SELECT name FROM tags LIMIT 50000")]
        return difflib.get_close_matches(name, names, n=3, cutoff=0.75)


def autocomplete(
    conn: sqlite3.Connection, counts: TagCounts, prefix: str, limit: int
) -> list[dict[str, Any]]:
    """Tags whose name starts with `prefix` (`*` anywhere is a wildcard; `ns:` narrows),
    most files first."""
    namespace = None
    head, sep, rest = prefix.partition(":")
    if sep and head.lower() in NAMESPACES:
        namespace, prefix = head.lower(), rest
    prefix = prefix.strip().lower().replace(" ", "_")
    where, params = [], []
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
    sql = f"SELECT id, namespace, name FROM tags WHERE {' AND '.join(where) or '1'} LIMIT 2000"
    rows = conn.execute(sql, params).fetchall()
    if not counts.ready and len(rows) > 200:
        rows = sorted(rows, key=lambda r: len(r[2]))[:200]
    found = [(counts.count(conn, int(tid)), str(ns), str(name)) for tid, ns, name in rows]
    found = sorted((f for f in found if f[0] > 0), key=lambda f: (-f[0], f[2]))
    return [{"namespace": ns, "tag": name, "count": n} for n, ns, name in found[:limit]]


def queue_state(conn: sqlite3.Connection) -> dict[str, Any]:
    """Daemon status, backlog, recent rate and ETA, the latest failures."""
    from tagd.index import jobs, status

    main = conn.execute("PRAGMA database_list").fetchone()
    report = status.report(conn, database=main[2] if main and main[2] else None)
    now = time.time()
    recent = conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'done' AND updated_at > ?", (now - 600,)
    ).fetchone()[0]
    rate = recent / 600.0
    backlog = report["jobs"]["queued"] + report["jobs"]["running"]
    failed = [
        {"path": r["path"], "error": r["error"], "attempts": r["attempts"]}
        for r in jobs.listing(conn, "failed", 100)
    ]
    report.update(
        backlog=backlog,
        rate_per_s=round(rate, 3),
        eta_s=round(backlog / rate) if rate > 0 else None,
        failed=failed,
    )
    return report


def set_paused(conn: sqlite3.Connection, paused: bool) -> None:
    from tagd.index import jobs

    jobs.set_paused(conn, paused)


def retry(conn: sqlite3.Connection, paths: list[str] | None) -> int:
    from tagd.index import jobs

    return jobs.retry_failed(conn, paths)


def hydrus_known(conn: sqlite3.Connection, file_id: int) -> bool:
    """Whether the last Hydrus sync found this file in Hydrus."""
    try:
        row = conn.execute(
            "SELECT max(known) FROM hydrus_pushed WHERE file_id = ?", (file_id,)
        ).fetchone()
    except sqlite3.Error:
        return False
    return bool(row and row[0])
