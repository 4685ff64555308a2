"""Synthetic embeddings with the structure a tagger's embeddings have, for the similar/ANN bench.

A tagger's pooled embedding is what its head reads the tags from, so files with the same
tags lie close together; and a gallery is made of sets (an artist, a series, a shoot) whose
images lie closer still, inside broader styles. The bench's tags are drawn independently per
file (they carry no such sets), so the vector is the sum of four unit parts:

- the file's tags: every tag has a fixed random direction (seeded by its id), summed over
  the file's stored scores weighted by the score (W_TAGS);
- its collection, one of COLLECTIONS drawn per file (W_COLLECTION), and that collection's
  theme (W_THEME): the low-dimensional cluster structure real embeddings have;
- per-file Gaussian noise (W_NOISE);

and every 1,000th file starts a planted cluster of 1-4 near-duplicates (its vector plus a
little noise: cosine ~0.99). Rows are normalised and stored as float16, the layout tagd
writes.

The old generator (i.i.d. Gaussian noise per file, `--embeddings noise`) stays for
comparison: in 1024-d such vectors are all nearly orthogonal, the "nearest" 20 of a file sit
at cosine ~0.14 against a median of 0 and are arbitrary, so an approximate index's recall on
them measures nothing a real gallery has.

`rewrite` replaces the embeddings of an existing bench database in place, in batches of
modest transactions; files, paths, tags and scores are not touched.
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

COLLECTIONS = 20_000  # artists / sets / series: ~50 files each at 1M
THEMES = 500  # broader styles, each holding ~40 collections
W_COLLECTION, W_THEME, W_TAGS, W_NOISE = 0.6, 0.45, 0.5, 0.45
DUPE_EVERY = 1000
DUPE_NOISE = 0.12
BLOCK = 1000  # files per generated block: planted clusters never straddle two


def directions(n_tags: int, dim: int, seed: int = 7) -> np.ndarray:
    """One unit vector per tag id (row = tag id; row 0 unused)."""
    d = np.random.default_rng(seed).standard_normal((n_tags + 1, dim), dtype=np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return d


@functools.cache
def _latent(dim: int) -> np.ndarray:
    return directions(COLLECTIONS + THEMES, dim, seed=13)


def structured(
    first_id: int,
    n: int,
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    dirs: np.ndarray,
) -> np.ndarray:
    """Unit float32 vectors for files first_id..first_id+n-1 from their (file, tag, score)
    rows. Seeded by the block, so a build and a rewrite produce the same vectors."""
    fids, tids, scores = rows
    dim = dirs.shape[1]
    latent = _latent(dim)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, BLOCK):
        lo = first_id + start
        m = min(BLOCK, n - start)
        rng = np.random.default_rng((lo, 11))
        sel = (fids >= lo) & (fids < lo + m)
        weights = np.zeros((m, dirs.shape[0]), dtype=np.float32)
        weights[fids[sel] - lo, tids[sel]] = scores[sel]
        tags = weights @ dirs  # a dense product: far faster than a gather + reduceat here
        tags /= np.maximum(np.linalg.norm(tags, axis=1, keepdims=True), 1e-6)
        coll = rng.integers(0, COLLECTIONS, size=m)
        theme = COLLECTIONS + 1 + (coll * 7919) % THEMES
        noise = rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        block = W_COLLECTION * latent[coll + 1] + W_THEME * latent[theme] + W_TAGS * tags
        block += W_NOISE * noise
        for base in range(lo + (-(lo - 1) % DUPE_EVERY), lo + m, DUPE_EVERY):
            size = 1 + (base // DUPE_EVERY) % 4
            i = base - lo
            v = block[i] / np.linalg.norm(block[i])
            for j in range(1, size + 1):
                if i + j < m:
                    e = rng.standard_normal(dim, dtype=np.float32)
                    block[i + j] = v + DUPE_NOISE * e / np.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + m] = block
    return out


def noise(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """The old generator: i.i.d. Gaussian rows (no neighbourhood structure)."""
    return rng.standard_normal((n, dim), dtype=np.float32)


def _score_rows(
    conn: sqlite3.Connection, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    got = conn.execute(
        "SELECT file_id, tag_id, score FROM scores WHERE file_id >= ? AND file_id < ? "
        "AND model_id = 1",
        (lo, hi),
    ).fetchall()
    arr = np.asarray(got, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2].astype(np.float32)


def _batches(top: int, batch: int) -> Iterator[tuple[int, int]]:
    for lo in range(1, top + 1, batch):
        yield lo, min(batch, top + 1 - lo)


def rewrite(db: Path, kind: str = "structured", batch: int = 5000, seed: int = 0) -> None:
    """Replace every embedding of model 1 in place, `batch` files per transaction.

    The embeddings' change-log trigger is dropped for the rewrite and put back after (also on
    an error): logging a million files would make every other cache beside the database (the
    ranking cache, the bitmaps, which do not read embeddings) rebuild. The caches that do
    read embeddings (`<db>.sim-*`, `<db>.ann-*`) are removed instead, and
    `embeddings.version` still moves, so an embedding cache made elsewhere is not reused.
    """
    assert batch % BLOCK == 0
    conn = sqlite3.connect(db, isolation_level=None, timeout=60)
    conn.execute("PRAGMA busy_timeout = 60000")
    top, dim = conn.execute("SELECT max(file_id), max(dim) FROM embeddings").fetchone()
    n_tags = conn.execute("SELECT max(id) FROM tags").fetchone()[0]
    trigger = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'embeddings_log_update'"
    ).fetchone()
    dirs = directions(n_tags, dim)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    if trigger is not None:
        conn.execute("DROP TRIGGER embeddings_log_update")
    try:
        for lo, n in _batches(top, batch):
            if kind == "noise":
                vecs = noise(rng, n, dim)
            else:
                vecs = structured(lo, n, _score_rows(conn, lo, lo + n), dirs)
            blobs = vecs.astype("<f2")
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "UPDATE embeddings SET vector = ?, dim = ?, dtype = 'float16' "
                "WHERE file_id = ? AND model_id = 1",
                [(blobs[k].tobytes(), dim, lo + k) for k in range(n)],
            )
            conn.execute("COMMIT")
            done = lo + n - 1
            rate = done / (time.perf_counter() - t0)
            print(f"\r{done:,} embeddings ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    finally:
        if trigger is not None:
            conn.execute(trigger[0])
        conn.close()
    print(file=sys.stderr)
    for stale in [*db.parent.glob(f"{db.name}.sim-*"), *db.parent.glob(f"{db.name}.ann-*")]:
        stale.unlink(missing_ok=True)
    print(f"rewrote {top:,} embeddings ({kind}) in {time.perf_counter() - t0:.0f} s")
