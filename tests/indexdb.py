"""Build a real tagd index without images: files, paths and stored predictions via tagd.index."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np

from tagd.index import db, models, paths, scores
from tagd.tagging.labels import Labels
from tagd.tagging.thresholds import select

LABELS = Labels(
    names=(
        "general",
        "sensitive",
        "long_hair",
        "smile",
        "^_^",
        "hatsune_miku",
        "artist_x",
        "vocaloid",
        "solo",
    ),
    namespaces=(
        "rating",
        "rating",
        "general",
        "general",
        "general",
        "character",
        "artist",
        "copyright",
        "general",
    ),
)
RULES: dict[str, float | str] = {
    "general": 0.35,
    "character": 0.85,
    "rating": "top",
    "artist": 0.5,
    "copyright": 0.5,
}


def sha_of(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()


def scores_for(tags: dict[str, float]) -> np.ndarray:
    out = np.zeros(len(LABELS), dtype=np.float32)
    for name, score in tags.items():
        out[LABELS.names.index(name)] = score
    return out


def make_index(
    path: Path, files: dict[str, dict[str, float]], model: str = "m1", missing: tuple = ()
) -> sqlite3.Connection:
    """`files`: image path → {tag: score}; selection uses RULES like the pipeline would."""
    conn = db.connect(path)
    with db.write(conn):
        rec = models.register_model(
            conn,
            name=model,
            family="wd14",
            source="test",
            revision="r1",
            labels=LABELS,
            settings={},
        )
        for p, tags in files.items():
            fid = paths.upsert_file(conn, sha_of(p), 10, 8, 8, "PNG")
            paths.upsert_path(conn, p, fid, 10, 1)
            probs = scores_for(tags)
            scores.save_prediction(
                conn,
                file_id=fid,
                model=rec,
                scores=probs,
                selected=select(probs, LABELS.namespaces, RULES),
                floor=0.05,
            )
        for p in missing:
            conn.execute("UPDATE paths SET missing = 1 WHERE path = ?", (p,))
    return conn
