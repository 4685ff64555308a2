"""Embedding rows as L2-normalised float32 matrices: what the exact scan and the HNSW index
both read from SQLite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

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
        i += _decode(rows, dim, ids[i:], mat[i:])
    ids, mat = ids[:i], mat[:i]
    for start in range(0, i, CHUNK_ROWS):
        mat[start : start + CHUNK_ROWS] = normalise(mat[start : start + CHUNK_ROWS])
    return ids, mat


def read_chunks(
    batches: Iterator[list[Any]], dim: int, chunk: int = CHUNK_ROWS
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """read_rows over batches of fetched rows: a build that never holds the whole matrix."""
    for rows in batches:
        ids = np.empty(len(rows), dtype=np.int64)
        mat = np.zeros((len(rows), dim), dtype=np.float32)
        i = _decode(rows, dim, ids, mat)
        if i:
            yield ids[:i], normalise(mat[:i])


def exhaustive_pairs(
    matrix: np.ndarray, min_sim: float, block: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows a, rows b, cosine) of every pair a < b at or above `min_sim`, block by block."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, matrix.shape[0], block):
        sims = np.asarray(matrix[start : start + block]) @ np.asarray(matrix).T
        r, c = np.nonzero(sims >= min_sim)
        a = r + start
        keep = c > a
        found.append((a[keep], c[keep], sims[r[keep], c[keep]]))
    return concat_pairs(found)


def concat_pairs(
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0, dtype=np.float32)
    return (
        np.concatenate([p[0] for p in parts]).astype(np.int64),
        np.concatenate([p[1] for p in parts]).astype(np.int64),
        np.concatenate([p[2] for p in parts]).astype(np.float32),
    )


def _decode(rows: list[Any], dim: int, ids: np.ndarray, mat: np.ndarray) -> int:
    """Fill ids/mat from (file_id, dim, dtype, vector) rows, skipping rows of another shape
    or dtype; returns how many were kept."""
    i = 0
    for file_id, d, dtype, blob in rows:
        if dtype != "float16" or d != dim or len(blob) != 2 * d:
            continue
        ids[i] = file_id
        mat[i] = np.frombuffer(blob, dtype="<f2")
        i += 1
    return i
