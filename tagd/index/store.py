"""Writing results: files, paths, models, tags and scores. Callers own the transaction.

Results are keyed by content (sha256) and model, so storing the same result twice replaces it
instead of duplicating it — a job retried after a crash is harmless.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np

from tagd.names import AS_TEXT, to_db

if TYPE_CHECKING:
    from tagd.tagging.labels import Labels


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    revision: str | None
    tag_ids: np.ndarray


def upsert_file(
    conn: sqlite3.Connection,
    sha256: str,
    size: int,
    width: int | None,
    height: int | None,
    fmt: str | None,
) -> int:
    row = conn.execute(
        """INSERT INTO files(sha256, size, width, height, format, first_seen)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT(sha256) DO UPDATE SET
               width = coalesce(excluded.width, width),
               height = coalesce(excluded.height, height),
               format = coalesce(excluded.format, format)
           RETURNING id""",
        (sha256, size, width, height, fmt, time.time()),
    ).fetchone()
    return int(row[0])


def upsert_path(
    conn: sqlite3.Connection, path: str, file_id: int | None, size: int, mtime_ns: int
) -> None:
    conn.execute(
        f"""INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen)
           VALUES ({AS_TEXT}, ?, ?, ?, 0, ?)
           ON CONFLICT(path) DO UPDATE SET
               file_id = excluded.file_id, size = excluded.size,
               mtime_ns = excluded.mtime_ns, missing = 0, last_seen = excluded.last_seen""",
        (to_db(path), file_id, size, mtime_ns, time.time()),
    )


def tag_id(conn: sqlite3.Connection, namespace: str, name: str) -> int:
    row = conn.execute(
        """INSERT INTO tags(namespace, name) VALUES (?, ?)
           ON CONFLICT(name, namespace) DO UPDATE SET name = excluded.name
           RETURNING id""",
        (namespace, name),
    ).fetchone()
    return int(row[0])


def register_model(
    conn: sqlite3.Connection,
    *,
    name: str,
    family: str,
    source: str,
    revision: str | None,
    labels: Labels,
    settings: dict[str, object],
) -> ModelRecord:
    """Create or update a model row and its output-index → tag mapping."""
    row = conn.execute(
        """INSERT INTO models(name, family, source, revision, n_tags, settings, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(name) DO UPDATE SET
               family = excluded.family, source = excluded.source,
               revision = excluded.revision, n_tags = excluded.n_tags,
               settings = excluded.settings, updated_at = excluded.updated_at
           RETURNING id""",
        (
            name,
            family,
            source,
            revision,
            len(labels),
            json.dumps(settings, sort_keys=True),
            time.time(),
        ),
    ).fetchone()
    model_id = int(row[0])
    existing = conn.execute(
        "SELECT idx, tag_id FROM model_tags WHERE model_id = ? ORDER BY idx", (model_id,)
    ).fetchall()
    ids = [tag_id(conn, ns, n) for n, ns in zip(labels.names, labels.namespaces, strict=True)]
    if [r[1] for r in existing] != ids:
        conn.execute("DELETE FROM model_tags WHERE model_id = ?", (model_id,))
        conn.executemany(
            "INSERT INTO model_tags(model_id, idx, tag_id) VALUES (?, ?, ?)",
            [(model_id, i, t) for i, t in enumerate(ids)],
        )
    return ModelRecord(model_id, name, revision, np.asarray(ids, dtype=np.int64))


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


def models_done(conn: sqlite3.Connection, file_id: int) -> set[int]:
    return {
        int(r[0])
        for r in conn.execute("SELECT model_id FROM taggings WHERE file_id = ?", (file_id,))
    }


def set_media_info(
    conn: sqlite3.Connection,
    file_id: int,
    duration: float | None,
    frames: int | None,
    fps: float | None,
) -> None:
    """A video's or animation's length (migration 0012); stills keep NULLs."""
    conn.execute(
        "UPDATE files SET duration = ?, frames = ?, fps = ? WHERE id = ?",
        (duration, frames, fps, file_id),
    )


def model_ids_for_sha(conn: sqlite3.Connection, sha256: str) -> set[int]:
    """Models that already tagged the file with this content (a worker skips them)."""
    rows = conn.execute(
        "SELECT t.model_id FROM taggings t JOIN files f ON f.id = t.file_id WHERE f.sha256 = ?",
        (sha256,),
    ).fetchall()
    return {r[0] for r in rows}
