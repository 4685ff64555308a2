"""An HNSW index (usearch) beside the database for `tagd similar`: top-k without a full scan.

The exact path (similar.EmbeddingIndex: one matrix-vector product over every embedding) reads
the whole matrix per query: 4 GiB at a million 1024-d files. The HNSW graph visits a few
thousand vectors instead. Candidates it returns are re-scored exactly from the float32
matrix, so every reported similarity is exact; what the graph can do is miss a neighbour
(recall, measured by bench/search_bench.py), and `tagd similar --exact` skips it.

On disk (tagd/sidecache.py's discipline): `<db>.ann-<model id>.json` (db id, change-log seq,
data file) and `<db>.ann-<model id>-<stamp>.usearch` (f16 vectors + graph, memory-mapped as
a view when queried). Files changed after the seq are excluded from the graph's answers and
scored exactly from SQLite instead; `refresh` patches them in (remove + add), or rebuilds
when too many changed. Below MIN_FILES embeddings the exact scan is as fast: no index.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tagd.index import changes, sidecache

ENV = "TAGD_ANN"


def enabled() -> bool:
    """The HNSW path is opt-in (TAGD_ANN=on) until its recall is measured on real galleries;
    the exact scan is the default and always correct."""
    if os.environ.get(ENV, "").strip().lower() not in ("1", "on", "true", "yes"):
        return False
    try:
        import usearch  # noqa: F401
    except ImportError:
        _warn_once(f"{ENV}=on, but usearch is not installed: pip install 'tagd[ann]'")
        return False
    return True


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning("%s; using the exact scan", message)


FORMAT = 1
MIN_FILES = 50_000
DIRTY_MAX = 100_000
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 256
OVERSAMPLE = 2


def kind(model_id: int) -> str:
    return f"ann-{model_id}"


def _new_index(dim: int) -> Any:
    from usearch.index import Index

    return Index(
        ndim=dim,
        metric="cos",
        dtype="f16",
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def _save(db_path: str | Path, model_id: int, index: Any, meta: dict[str, Any]) -> None:
    """Data file (usearch writes it to a temporary name, renamed into place), then meta."""
    folder = Path(db_path).parent
    name = f"{Path(db_path).name}.{kind(model_id)}-{time.time_ns()}.usearch"
    tmp = folder / f".{name}.tagd-tmp"
    try:
        index.save(str(tmp))
        os.chmod(tmp, sidecache.folder_mode(db_path))
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    old = sidecache.read_meta(db_path, kind(model_id), FORMAT)
    meta = {**meta, "format": FORMAT, "file": name}
    sidecache.replace(db_path, kind(model_id), meta, None if old is None else old.get("file"))


def build(
    conn: sqlite3.Connection, db_path: str | Path, model_id: int, ids: np.ndarray, mat: np.ndarray
) -> None:
    """A fresh graph over (ids, L2-normalised rows) read in the snapshot of `seq`."""
    seq, ident = changes.current_seq(conn), changes.db_id(conn)
    index = _new_index(mat.shape[1])
    index.add(np.asarray(ids, dtype=np.uint64), np.asarray(mat), threads=_threads())
    meta = {"db_id": ident, "seq": seq, "model_id": model_id, "dim": int(mat.shape[1])}
    meta["built_at"] = time.time()
    _save(db_path, model_id, index, meta)


def patch(
    conn: sqlite3.Connection, db_path: str | Path, model_id: int, meta: dict[str, Any]
) -> int | None:
    """Take the files changed since the index's seq in; None when a rebuild is due."""
    from usearch.index import Index

    from tagd.search.vectors import read_rows

    seq = changes.current_seq(conn)
    dirty = changes.changed_since(conn, int(meta["seq"]), DIRTY_MAX)
    if dirty is None:
        return None
    index = Index.restore(str(Path(db_path).parent / meta["file"]))
    if index is None:
        return None
    cur = conn.execute(
        "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? "
        "AND file_id IN (SELECT value FROM json_each(?)) ORDER BY file_id",
        (model_id, _json(dirty)),
    )
    ids, rows = read_rows(cur, len(dirty), int(meta["dim"]))
    present = [k for k in dirty if index.contains(k)]
    if present:
        index.remove(np.asarray(present, dtype=np.uint64))
    if len(ids):
        index.add(np.asarray(ids, dtype=np.uint64), rows, threads=_threads())
    _save(db_path, model_id, index, {**meta, "seq": seq})
    return len(dirty)


def _json(ids: list[int]) -> str:
    import json

    return json.dumps(ids)


@dataclass
class Ann:
    """An open, usable index: the graph as a memory-mapped view, and the files changed since."""

    index: Any
    dirty: set[int]

    @classmethod
    def open(cls, conn: sqlite3.Connection, db_path: str | Path, model_id: int) -> Ann | None:
        """None when missing, of another database, newer than it, or too far behind."""
        from usearch.index import Index

        meta = sidecache.read_meta(db_path, kind(model_id), FORMAT)
        if meta is None or not sidecache.usable(meta, conn):
            return None
        dirty = changes.changed_since(conn, int(meta["seq"]), DIRTY_MAX)
        if dirty is None:
            return None
        try:
            index = Index.restore(str(Path(db_path).parent / meta["file"]), view=True)
        except (OSError, RuntimeError, ValueError):
            return None
        if index is None:
            return None
        index.expansion_search = EXPANSION_SEARCH  # type: ignore[misc]  # stubs lack the setter
        return cls(index, set(dirty))

    def candidates(self, vector: np.ndarray, k: int) -> np.ndarray:
        """Up to k * OVERSAMPLE file ids the graph finds nearest, changed files left out."""
        vector = np.asarray(vector, dtype=np.float32)
        want = k * OVERSAMPLE + 1
        gone = np.fromiter(self.dirty, dtype=np.int64, count=len(self.dirty))
        while True:
            found = self.index.search(vector, min(want, len(self.index)))
            keys = np.asarray(found.keys, dtype=np.int64)
            kept = keys[~np.isin(keys, gone)] if len(gone) else keys
            if len(kept) > k or len(keys) >= len(self.index):
                return kept
            want *= 4
