"""The models-and-labels family (`models`, `tags`, `model_tags`, `model_heads`): registering a
model with its output columns, the tags they name, recorded settings, and the embedding →
tag head. Lookups by name for messages are inventory.model_id's.

numpy only where a model is registered: the head's float32 arrays travel as bytes and the
tagging stage shapes them, so a reader of settings does not pay numpy's import."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from tagd.tagging.labels import Labels


@dataclass(frozen=True)
class ModelRecord:
    id: int
    name: str
    revision: str | None
    tag_ids: np.ndarray  # column → tag id


def tag_id(conn: sqlite3.Connection, namespace: str, name: str) -> int:
    """The id of the tag, created when new."""
    row = conn.execute(
        """INSERT INTO tags(namespace, name) VALUES (?, ?)
           ON CONFLICT(name, namespace) DO UPDATE SET name = excluded.name
           RETURNING id""",
        (namespace, name),
    ).fetchone()
    return int(row[0])


def tag_ids(conn: sqlite3.Connection, tags: list[tuple[str, str]]) -> list[int]:
    """The ids of (namespace, name) pairs, in order, the missing ones created: one batch of
    inserts and one read of those namespaces' tags, where a statement per tag cost every
    start ~0.15 s for a model of 10,861 labels (and rewrote each existing row)."""
    conn.executemany("INSERT OR IGNORE INTO tags(namespace, name) VALUES (?, ?)", tags)
    spaces = sorted({ns for ns, _ in tags})
    marks = ", ".join("?" * len(spaces))
    known = {
        (str(ns), str(name)): int(tid)
        for tid, ns, name in conn.execute(
            f"SELECT id, namespace, name FROM tags WHERE namespace IN ({marks})", spaces
        )
    }
    return [known[t] for t in tags]


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
    import numpy as np

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
    ids = tag_ids(conn, list(zip(labels.namespaces, labels.names, strict=True)))
    if [r[1] for r in existing] != ids:
        conn.execute("DELETE FROM model_tags WHERE model_id = ?", (model_id,))
        conn.executemany(
            "INSERT INTO model_tags(model_id, idx, tag_id) VALUES (?, ?, ?)",
            [(model_id, i, t) for i, t in enumerate(ids)],
        )
    return ModelRecord(model_id, name, revision, np.asarray(ids, dtype=np.int64))


def ids_by_name(conn: sqlite3.Connection) -> dict[str, int]:
    """Every model in the index: name → id."""
    return {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, id FROM models")}


def outputs(conn: sqlite3.Connection, model_id: int) -> list[tuple[str, str, int]]:
    """The model's output columns as recorded when it last ran, in column order:
    (name, namespace, tag id)."""
    rows = conn.execute(
        """SELECT t.name, t.namespace, t.id FROM model_tags mt JOIN tags t ON t.id = mt.tag_id
           WHERE mt.model_id = ? ORDER BY mt.idx""",
        (model_id,),
    ).fetchall()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def settings(
    conn: sqlite3.Connection, *, model_id: int | None = None, name: str | None = None
) -> Any:
    """The model's recorded settings (parsed JSON, {} when empty), by id or by name; None
    when there is no such model. ValueError when the stored text is not JSON."""
    if model_id is not None:
        row = conn.execute("SELECT settings FROM models WHERE id = ?", (model_id,)).fetchone()
    else:
        row = conn.execute("SELECT settings FROM models WHERE name = ?", (name,)).fetchone()
    return json.loads(row[0] or "{}") if row else None


def set_settings(conn: sqlite3.Connection, model_id: int, value: dict[str, Any]) -> None:
    conn.execute(
        "UPDATE models SET settings = ? WHERE id = ?",
        (json.dumps(value, sort_keys=True), model_id),
    )


@dataclass(frozen=True)
class StoredHead:
    """A model's head as stored: little-endian float32 weights (dim × n_tags) and bias."""

    revision: str | None
    dim: int
    n_tags: int
    weights: bytes
    bias: bytes


def save_head(conn: sqlite3.Connection, model_id: int, head: StoredHead) -> None:
    """Store the head unless the same one is stored: it is tens of megabytes, and every
    start of a daemon or scan registers its models."""
    same = conn.execute(
        "SELECT 1 FROM model_heads WHERE model_id = ? AND revision IS ? AND dim = ? "
        "AND n_tags = ? AND weights = ? AND bias = ?",
        (model_id, head.revision, head.dim, head.n_tags, head.weights, head.bias),
    ).fetchone()
    if same is not None:
        return
    conn.execute(
        """INSERT INTO model_heads(model_id, revision, dim, n_tags, weights, bias, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(model_id) DO UPDATE SET
               revision = excluded.revision, dim = excluded.dim, n_tags = excluded.n_tags,
               weights = excluded.weights, bias = excluded.bias,
               updated_at = excluded.updated_at""",
        (model_id, head.revision, head.dim, head.n_tags, head.weights, head.bias, time.time()),
    )


def load_head(conn: sqlite3.Connection, model_id: int) -> StoredHead | None:
    row = conn.execute(
        "SELECT revision, dim, n_tags, weights, bias FROM model_heads WHERE model_id = ?",
        (model_id,),
    ).fetchone()
    if row is None:
        return None
    return StoredHead(row[0], int(row[1]), int(row[2]), bytes(row[3]), bytes(row[4]))
