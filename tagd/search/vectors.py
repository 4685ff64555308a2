"""Embedding rows as L2-normalised float32 matrices: what the exact scan and the HNSW index
both read from SQLite."""

from __future__ import annotations

import sqlite3

import numpy as np

CHUNK_ROWS = 65536


def normalise(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return m / norms


def read_rows(cur: sqlite3.Cursor, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, L2-normalised rows) from (file_id, dim, dtype, vector) rows; other dims skipped."""
    ids = np.empty(n, dtype=np.int64)
    mat = np.zeros((n, dim), dtype=np.float32)
    i = 0
    while rows := cur.fetchmany(8192):
        for file_id, d, dtype, blob in rows:
            if dtype != "float16" or d != dim or len(blob) != 2 * d:
                continue
            ids[i] = file_id
            mat[i] = np.frombuffer(blob, dtype="<f2")
            i += 1
    ids, mat = ids[:i], mat[:i]
    for start in range(0, i, CHUNK_ROWS):
        mat[start : start + CHUNK_ROWS] = normalise(mat[start : start + CHUNK_ROWS])
    return ids, mat
