"""Effective tags per file: the stored `scores` rows with selected=1, read in chunks, with
human review applied (tagd/review.py): a rejected tag is dropped from every model, an
accepted or added tag is reported once as model "human" with score 1.0.

Exports, sidecars, Hydrus sync and evaluation all consume the same decision (thresholds,
blacklist and aliases are already reflected in `selected`), so they read it here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tagd.search.query import Node

CHUNK = 500


@dataclass(frozen=True)
class ScoredTag:
    model: str
    namespace: str
    name: str
    score: float
    selected: bool = True


@dataclass(frozen=True)
class FileTagSet:
    file_id: int
    sha256: str
    paths: tuple[str, ...]
    tags: tuple[ScoredTag, ...]

    def merged(self) -> dict[tuple[str, str], float]:
        """(namespace, name) → best score over models."""
        out: dict[tuple[str, str], float] = {}
        for t in self.tags:
            key = (t.namespace, t.name)
            out[key] = max(out.get(key, 0.0), t.score)
        return out


def model_ids(conn: sqlite3.Connection, names: Sequence[str] | None) -> dict[str, int]:
    """Known models by name; an unknown name is a ValueError naming the known ones."""
    rows = {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, id FROM models")}
    if not names:
        return rows
    missing = [n for n in names if n not in rows]
    if missing:
        known = ", ".join(sorted(rows)) or "none yet (run `tagd scan`)"
        raise ValueError(
            f"no results stored for model {missing[0]!r} (models in the index: {known})"
        )
    return {n: rows[n] for n in names}


def iter_files(
    conn: sqlite3.Connection,
    *,
    models: Sequence[str] | None = None,
    node: Node | None = None,
    all_scores: bool = False,
    reviews: bool = True,
) -> Iterator[FileTagSet]:
    """Files with at least one present path (optionally matching `node`), in file id order.

    `reviews=False` gives the models' own decisions (what `tagd eval` scores)."""
    from tagd.index import reviews as review
    from tagd.search.compile import compile_where

    ids = model_ids(conn, models)
    if not ids:
        return
    where, params = "1", []
    if node is not None:
        compiled = compile_where(node, reviews=reviews and review.in_use(conn))
        where, params = compiled.sql, list(compiled.params)
    file_rows = conn.execute(
        "SELECT f.id, f.sha256 FROM files f WHERE EXISTS "
        "(SELECT 1 FROM paths p WHERE p.file_id = f.id AND p.missing = 0) "
        f"AND ({where}) ORDER BY f.id",
        params,
    ).fetchall()
    names = {v: k for k, v in ids.items()}
    mids = ",".join(str(i) for i in ids.values())
    selected = "" if all_scores else " AND s.selected = 1"
    for start in range(0, len(file_rows), CHUNK):
        chunk = file_rows[start : start + CHUNK]
        fids = ",".join(str(int(r[0])) for r in chunk)
        paths: dict[int, list[str]] = {}
        for fid, path in conn.execute(
            f"SELECT file_id, path FROM paths WHERE missing = 0 AND file_id IN ({fids}) "
            "ORDER BY path"
        ):
            paths.setdefault(int(fid), []).append(str(path))
        tags: dict[int, list[ScoredTag]] = {}
        for fid, mid, ns, name, score, sel in conn.execute(
            "SELECT s.file_id, s.model_id, t.namespace, t.name, s.score, s.selected FROM scores s "
            f"JOIN tags t ON t.id = s.tag_id WHERE s.file_id IN ({fids}) "
            f"AND s.model_id IN ({mids}){selected} ORDER BY s.file_id, s.score DESC"
        ):
            tags.setdefault(int(fid), []).append(
                ScoredTag(names[int(mid)], str(ns), str(name), float(score), bool(sel))
            )
        verdicts = review.overrides(conn, (r[0] for r in chunk)) if reviews else {}
        for fid, sha in chunk:
            found = tags.get(int(fid), [])
            if int(fid) in verdicts:
                found = _reviewed(found, verdicts[int(fid)])
            yield FileTagSet(int(fid), str(sha), tuple(paths.get(int(fid), ())), tuple(found))


def _reviewed(tags: list[ScoredTag], verdicts: dict[tuple[str, str], int]) -> list[ScoredTag]:
    from tagd.index.reviews import HUMAN

    kept = [t for t in tags if verdicts.get((t.namespace, t.name), 0) != -1]
    added = [ScoredTag(HUMAN, ns, name, 1.0) for (ns, name), v in verdicts.items() if v == 1]
    return sorted(added, key=lambda t: (t.namespace, t.name)) + kept
