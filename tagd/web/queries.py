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

from tagd.index import changes, db, hydrus_state
from tagd.index import reviews as review
from tagd.index import webviews as views
from tagd.index.paths import file_id_for_sha
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
    fid = file_id_for_sha(conn, sha)
    if fid is None:
        return None
    paths = views.present_paths(conn, fid)
    return (fid, paths) if paths else None


def browse(
    conn: sqlite3.Connection, newest: bool, limit: int, offset: int
) -> list[tuple[str, int, str]]:
    """(path, file id, sha256) of every present image, by path or newest first: the grid of
    an empty query."""
    return views.browse(conn, newest, limit, offset)


def dims(conn: sqlite3.Connection, file_ids: list[int]) -> dict[int, tuple[Any, Any]]:
    return views.dims(conn, file_ids)


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
    size, width, height, fmt = views.file_row(conn, fid)
    models: dict[str, list[dict[str, Any]]] = {}
    thresholds: dict[str, dict[str, float]] = {}
    for name, settings in views.models_of(conn, fid):
        models[name] = []
        thresholds[name] = _thresholds(settings)
    for model, ns, name, score, sel in views.scores_of(conn, fid):
        models.setdefault(model, []).append(
            {"namespace": ns, "tag": name, "score": round(score, 4), "selected": bool(sel)}
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
        size,
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
    """The effective tags of these files (a page of results) with how many carry each."""
    if not file_ids:
        return []
    rows = views.hits_tags(conn, file_ids, limit)
    return [{"namespace": ns, "tag": name, "count": n} for ns, name, n in rows]


def tag_names(conn: sqlite3.Connection, term: Tag) -> bool:
    """Whether the index knows a tag this term names."""
    return views.tag_known(conn, term.name, term.namespace)


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
                counts = views.selected_counts(conn)
                names = sorted(set(views.tag_names(conn)))
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
        return views.selected_count_capped(conn, tag_id, self.CAP)

    def suggest(self, conn: sqlite3.Connection, name: str) -> list[str]:
        """Close tag names for an unknown one ("did you mean")."""
        names = self._names
        if not names:
            names = views.tag_names(conn, 50000)
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
    rows = views.tags_starting(conn, prefix, namespace, 2000)
    if not counts.ready and len(rows) > 200:
        rows = sorted(rows, key=lambda r: len(r[2]))[:200]
    found = [(counts.count(conn, int(tid)), str(ns), str(name)) for tid, ns, name in rows]
    found = sorted((f for f in found if f[0] > 0), key=lambda f: (-f[0], f[2]))
    return [{"namespace": ns, "tag": name, "count": n} for n, ns, name in found[:limit]]


def queue_state(conn: sqlite3.Connection) -> dict[str, Any]:
    """Daemon status, backlog, recent rate and ETA, the latest failures."""
    from tagd.index import jobs, status

    report = status.report(conn, database=db.database_file(conn))
    recent = jobs.done_since(conn, time.time() - 600)
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
    return hydrus_state.known(conn, file_id)
