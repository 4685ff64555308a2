"""The scores family (`scores`, `taggings`, `embeddings`, and the `score_changes` log they
feed): one fresh result per (file, model), alias rows, embeddings, the chunked reads and
rewrites of `tagd reindex`, and the reads of effective tags. Callers own the transaction.

Results are keyed by content (sha256) and model, so storing the same result twice replaces it
instead of duplicating it — a job retried after a crash is harmless. Rewrites log the files
they change in `score_changes` (changes.py) for the caches; triggers log fresh results."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tagd.index.models import ModelRecord


def save_prediction(
    conn: sqlite3.Connection,
    *,
    file_id: int,
    model: ModelRecord,
    scores: np.ndarray,
    selected: np.ndarray,
    floor: float,
) -> int:
    """Replace one (file, model) result: scores >= floor plus every selected tag."""
    keep = np.flatnonzero((scores >= floor) | selected)
    conn.execute("DELETE FROM scores WHERE file_id = ? AND model_id = ?", (file_id, model.id))
    # tolist() converts whole arrays to the same Python ints and floats that per-element
    # int()/float() gave, at a fraction of the CPU (this runs for every image).
    conn.executemany(
        "INSERT INTO scores(file_id, model_id, tag_id, score, selected) VALUES (?, ?, ?, ?, ?)",
        zip(
            repeat(file_id),
            repeat(model.id),
            model.tag_ids[keep].tolist(),
            scores[keep].tolist(),
            selected[keep].astype(np.int64).tolist(),
        ),
    )
    conn.execute(
        """INSERT INTO taggings(file_id, model_id, revision, floor, tagged_at)
           VALUES (?, ?, ?, ?, ?)
           ON CONFLICT(file_id, model_id) DO UPDATE SET
               revision = excluded.revision, floor = excluded.floor,
               tagged_at = excluded.tagged_at""",
        (file_id, model.id, model.revision, floor, time.time()),
    )
    return len(keep)


def add_alias_score(
    conn: sqlite3.Connection, file_id: int, model_id: int, tag_id: int, score: float
) -> None:
    """An aliased tag's target is selected, with the best score of the tags aliased to it."""
    conn.execute(
        """INSERT INTO scores(file_id, model_id, tag_id, score, selected)
           VALUES (?, ?, ?, ?, 1)
           ON CONFLICT(file_id, model_id, tag_id) DO UPDATE SET
               selected = 1, score = max(score, excluded.score)""",
        (file_id, model_id, tag_id, score),
    )


def save_embedding(
    conn: sqlite3.Connection, file_id: int, model_id: int, dim: int, dtype: str, data: bytes
) -> None:
    conn.execute(
        """INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT(file_id, model_id) DO UPDATE SET
               dim = excluded.dim, dtype = excluded.dtype, vector = excluded.vector""",
        (file_id, model_id, dim, dtype, data),
    )


def taggings_after(
    conn: sqlite3.Connection, model_id: int, after_file_id: int, limit: int
) -> list[tuple[int, float]]:
    """(file id, floor) of the next `limit` files the model tagged, by file id."""
    rows = conn.execute(
        "SELECT file_id, floor FROM taggings WHERE model_id = ? AND file_id > ? "
        "ORDER BY file_id LIMIT ?",
        (model_id, after_file_id, limit),
    ).fetchall()
    return [(int(r[0]), float(r[1])) for r in rows]


def scores_between(
    conn: sqlite3.Connection, model_id: int, low: int, high: int
) -> Iterator[tuple[int, int, float, int]]:
    """(file id, tag id, score, selected) of the model's stored scores for file ids in
    [low, high], streamed."""
    yield from conn.execute(
        "SELECT file_id, tag_id, score, selected FROM scores "
        "WHERE model_id = ? AND file_id BETWEEN ? AND ?",
        (model_id, low, high),
    )


def embeddings_of(
    conn: sqlite3.Connection, model_id: int, file_ids: Sequence[int]
) -> list[tuple[int, bytes]]:
    """(file id, stored vector bytes) for those of `file_ids` that have an embedding."""
    marks = ",".join("?" * len(file_ids))
    rows = conn.execute(
        f"SELECT file_id, vector FROM embeddings WHERE model_id = ? AND file_id IN ({marks})",
        (model_id, *file_ids),
    ).fetchall()
    return [(int(r[0]), bytes(r[1])) for r in rows]


def rewrite(
    conn: sqlite3.Connection,
    *,
    upserts: Sequence[tuple[float, int, int, int, int]],
    deletes: Sequence[tuple[int, int, int]],
    floors: Sequence[tuple[float, int, int]],
) -> None:
    """Apply decided score changes and log the changed files. `upserts`: (score, selected,
    file, model, tag); `deletes`: (file, model, tag); `floors`: (floor, file, model), the
    taggings whose stored floor moved."""
    conn.executemany(
        """INSERT INTO scores(score, selected, file_id, model_id, tag_id) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT(file_id, model_id, tag_id) DO UPDATE SET
               score = excluded.score, selected = excluded.selected""",
        upserts,
    )
    conn.executemany(
        "DELETE FROM scores WHERE file_id = ? AND model_id = ? AND tag_id = ?", deletes
    )
    conn.executemany("UPDATE taggings SET floor = ? WHERE file_id = ? AND model_id = ?", floors)
    changed = sorted({u[2] for u in upserts} | {d[0] for d in deletes})
    conn.executemany(
        "INSERT OR REPLACE INTO score_changes(file_id) VALUES (?)", [(f,) for f in changed]
    )


def tags_of(
    conn: sqlite3.Connection,
    file_ids: Iterable[int],
    model_ids: Iterable[int],
    *,
    selected_only: bool = True,
) -> Iterator[tuple[int, int, str, str, float, bool]]:
    """(file id, model id, namespace, name, score, selected) of these files' stored scores
    from these models, by file then best score first."""
    fids = ",".join(str(int(f)) for f in file_ids)
    mids = ",".join(str(int(m)) for m in model_ids)
    selected = " AND s.selected = 1" if selected_only else ""
    for fid, mid, ns, name, score, sel in conn.execute(
        "SELECT s.file_id, s.model_id, t.namespace, t.name, s.score, s.selected FROM scores s "
        f"JOIN tags t ON t.id = s.tag_id WHERE s.file_id IN ({fids}) "
        f"AND s.model_id IN ({mids}){selected} ORDER BY s.file_id, s.score DESC"
    ):
        yield int(fid), int(mid), str(ns), str(name), float(score), bool(sel)


def models_done(conn: sqlite3.Connection, file_id: int) -> set[int]:
    return {
        int(r[0])
        for r in conn.execute("SELECT model_id FROM taggings WHERE file_id = ?", (file_id,))
    }


def model_ids_for_sha(conn: sqlite3.Connection, sha256: str) -> set[int]:
    """Models that already tagged the file with this content (a worker skips them)."""
    rows = conn.execute(
        "SELECT t.model_id FROM taggings t JOIN files f ON f.id = t.file_id WHERE f.sha256 = ?",
        (sha256,),
    ).fetchall()
    return {r[0] for r in rows}
