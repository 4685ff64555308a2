"""Nearest images by cosine similarity of stored embeddings, and near-duplicate groups.

The `embeddings` table holds raw float16 vectors. Top-k queries go to the HNSW index beside
the database (ann.py) when it is usable: candidates from the graph, scored exactly from the
stored rows. Otherwise, and with `--exact`, the exact scan: an L2-normalised float32 matrix
plus the file ids, built from SQLite on demand and cached next to the database through
sidecache.py (`<db>.sim-<model id>.json` names `<db>.sim-<model id>-<stamp>.npy` and its
`.ids.npy`; the database's id, change-log seq and embeddings counter it reflects). Files
changed since are read from SQLite; a cache that cannot be written is logged once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagd.index import changes, inventory, sidecache
from tagd.names import AS_TEXT, for_humans, to_db
from tagd.search import ann
from tagd.search.vectors import CHUNK_ROWS, concat_pairs, exhaustive_pairs, read_rows

DELTA_MAX = 100_000  # changed files read from SQLite before a rebuild is cheaper
SIM_FORMAT = 1
DUPES_DIRTY_MAX = 20_000  # changed files `dupes` compares among themselves before the scan

log = logging.getLogger(__name__)


def sim_kind(model_id: int) -> str:
    return f"sim-{model_id}"


class SimilarError(Exception):
    """No embeddings, unknown model or file: one line the user can act on."""


def resolve_ref(conn: sqlite3.Connection, ref: str) -> int:
    """A file id from a path (as indexed) or a sha256 (full, or a unique prefix of 8+)."""
    if re.fullmatch(r"[0-9a-fA-F]{8,64}", ref):
        rows = conn.execute(
            "SELECT id FROM files WHERE sha256 >= ? AND sha256 < ? LIMIT 2",
            (ref.lower(), ref.lower() + "g"),
        ).fetchall()
        if len(rows) == 1:
            return int(rows[0][0])
        if len(rows) > 1:
            raise SimilarError(f"sha256 prefix {ref} matches several files: give more digits")
    path = os.path.abspath(os.path.expanduser(ref))
    row = conn.execute(
        f"SELECT file_id FROM paths WHERE path = {AS_TEXT} AND missing = 0 AND file_id IS NOT NULL",
        (to_db(path),),
    ).fetchone()
    if row is None:
        raise SimilarError(
            f"{for_humans(path)} is not in the index (not scanned yet, or not a known sha256)"
        )
    return int(row[0])


def pick_model(conn: sqlite3.Connection, name: str | None) -> tuple[int, str]:
    """The named model, or the first (oldest) model that has embeddings."""
    if name is not None:
        return inventory.require_model_id(conn, name), name
    row = conn.execute(
        "SELECT m.id, m.name FROM models m WHERE EXISTS "
        "(SELECT 1 FROM embeddings e WHERE e.model_id = m.id) ORDER BY m.id LIMIT 1"
    ).fetchone()
    if row is None:
        raise SimilarError("no embeddings stored yet: tag images with a model that has them")
    return int(row[0]), str(row[1])


def signature(conn: sqlite3.Connection, model_id: int) -> dict[str, object]:
    """What the cached index was built from: the change counter kept by triggers (migration
    0004) and the change log's seq (0006), or on an older schema the row count and max rowid
    of the model's embeddings."""
    row = conn.execute("SELECT value FROM state WHERE key = 'embeddings.version'").fetchone()
    if row is not None:
        sig: dict[str, object] = {"model_id": model_id, "version": int(row[0])}
        if changes.logged(conn):
            sig.update(seq=changes.current_seq(conn), db_id=changes.db_id(conn))
        return sig
    n, top = conn.execute(
        "SELECT count(*), coalesce(max(rowid), 0) FROM embeddings WHERE model_id = ?",
        (model_id,),
    ).fetchone()
    return {"model_id": model_id, "rows": int(n), "max_rowid": int(top)}


def changed_files(
    meta: dict[str, object], sig: dict[str, object], conn: sqlite3.Connection
) -> list[int] | None:
    """Files whose embeddings may differ from a cache built at `meta`, or None when the
    cache cannot be brought up to date that way (another database, too many changes)."""
    seq, now = meta.get("seq"), sig.get("seq")
    if not isinstance(seq, int) or not isinstance(now, int) or seq > now:
        return None
    if meta.get("model_id") != sig["model_id"] or meta.get("db_id") != sig.get("db_id"):
        return None
    if seq == now and meta.get("version") != sig.get("version"):
        return None  # embeddings changed without reaching the log: nothing to read back
    return changes.changed_since(conn, seq, DELTA_MAX)


def build_matrix(conn: sqlite3.Connection, model_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, L2-normalised float32 rows) for one model, read in chunks."""
    n, dim = conn.execute(
        "SELECT count(*), max(dim) FROM embeddings WHERE model_id = ?", (model_id,)
    ).fetchone()
    if not n:
        raise SimilarError("no embeddings stored for this model yet")
    cur = conn.execute(
        "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? ORDER BY file_id",
        (model_id,),
    )
    return read_rows(cur, n, dim)


@dataclass
class EmbeddingIndex:
    """The cached matrix, plus the files changed since it was written (`extra_*` rows read
    from SQLite; `hidden`: their stale rows in `matrix`)."""

    model_id: int
    model: str
    ids: np.ndarray
    matrix: np.ndarray
    extra_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    extra: np.ndarray = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))
    hidden: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def open(
        cls,
        conn: sqlite3.Connection,
        db_path: str | Path | None,
        model: str | None,
        *,
        changes_ok: bool = True,
    ) -> EmbeddingIndex:
        """Load the cached index if its signature matches; with `changes_ok`, also when up to
        DELTA_MAX files changed since (their rows come from SQLite); else rebuild and cache.

        A daemon tagging all day would otherwise make every `tagd similar` rebuild.
        """
        model_id, name = pick_model(conn, model)
        sig = signature(conn, model_id)
        if db_path is not None:
            meta = sidecache.read_meta(db_path, sim_kind(model_id), SIM_FORMAT)
            if meta is not None:
                cached = {k: v for k, v in meta.items() if k not in ("format", "file", "ids")}
                changed: list[int] | None = [] if cached == sig else None
                if changed is None and changes_ok:
                    changed = changed_files(meta, sig, conn)
                if changed is not None:
                    try:
                        folder = Path(db_path).parent
                        ids = np.load(folder / str(meta["ids"]))
                        mat = np.load(folder / str(meta["file"]), mmap_mode="r")
                    except (OSError, ValueError, KeyError):
                        ids, mat = np.empty(0), np.empty((1, 0))
                    if len(ids) and len(ids) == mat.shape[0]:
                        index = cls(model_id, name, ids, mat)
                        return index.with_changes(conn, changed) if changed else index
        ids, mat = build_matrix(conn, model_id)
        if db_path is not None:
            _save(db_path, model_id, ids, mat, sig)
        return cls(model_id, name, ids, mat)

    def with_changes(self, conn: sqlite3.Connection, file_ids: list[int]) -> EmbeddingIndex:
        """This index with the current embeddings of `file_ids` read from SQLite."""
        cur = conn.execute(
            "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? "
            "AND file_id IN (SELECT value FROM json_each(?)) ORDER BY file_id",
            (self.model_id, json.dumps(file_ids)),
        )
        extra_ids, extra = read_rows(cur, len(file_ids), self.matrix.shape[1])
        wanted = np.asarray(sorted(file_ids), dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.ids, wanted), max(len(self.ids) - 1, 0))
        hidden = pos[self.ids[pos] == wanted] if len(self.ids) else pos[:0]
        return EmbeddingIndex(
            self.model_id, self.model, self.ids, self.matrix, extra_ids, extra, hidden
        )

    def rows_for(self, file_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file ids that have a current embedding, those rows): changed files from SQLite."""
        file_ids = np.unique(np.asarray(file_ids, dtype=np.int64))
        j = np.minimum(np.searchsorted(self.extra_ids, file_ids), max(len(self.extra_ids) - 1, 0))
        in_extra = (
            self.extra_ids[j] == file_ids if len(self.extra_ids) else np.zeros(len(file_ids), bool)
        )
        i = np.minimum(np.searchsorted(self.ids, file_ids), max(len(self.ids) - 1, 0))
        in_matrix = self.ids[i] == file_ids if len(self.ids) else np.zeros(len(file_ids), bool)
        if len(self.hidden):
            in_matrix &= ~np.isin(i, self.hidden)
        in_matrix &= ~in_extra
        order = np.argsort(i[in_matrix])
        pos, from_matrix = i[in_matrix][order], file_ids[in_matrix][order]
        dim = self.matrix.shape[1]
        rows = np.concatenate(
            [
                self.extra[j[in_extra]].reshape(-1, dim),
                np.asarray(self.matrix[pos]).reshape(-1, dim),
            ]
        )
        ids = np.concatenate([file_ids[in_extra], from_matrix])
        return ids, rows

    def vector(self, file_id: int) -> np.ndarray:
        j = int(np.searchsorted(self.extra_ids, file_id))
        if j < len(self.extra_ids) and self.extra_ids[j] == file_id:
            return self.extra[j]
        i = int(np.searchsorted(self.ids, file_id))
        if i >= len(self.ids) or self.ids[i] != file_id or i in set(self.hidden.tolist()):
            raise SimilarError(f"that file has no embedding from model {self.model!r} yet")
        return np.asarray(self.matrix[i])

    def similarities(self, vector: np.ndarray) -> np.ndarray:
        out = np.empty(self.matrix.shape[0], dtype=np.float32)
        for start in range(0, len(out), CHUNK_ROWS * 4):
            out[start : start + CHUNK_ROWS * 4] = (
                self.matrix[start : start + CHUNK_ROWS * 4] @ vector
            )
        return out

    def scored(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file ids, cosine) of every indexed file; stale rows score -inf."""
        sims = self.similarities(vector)
        if not len(self.extra_ids) and not len(self.hidden):
            return self.ids, sims
        sims[self.hidden] = -np.inf
        extra = self.extra @ vector if len(self.extra_ids) else np.empty(0, dtype=np.float32)
        return np.concatenate([self.ids, self.extra_ids]), np.concatenate([sims, extra])

    def nearest(
        self,
        vector: np.ndarray,
        *,
        limit: int | None = 20,
        min_sim: float | None = None,
        exclude: int | None = None,
        exact: bool = False,
    ) -> list[tuple[int, float]]:
        """(file_id, cosine) best first over every file; `exclude` is a file id. (`exact` is
        accepted for callers that pass it through: this scan is always exact.)"""
        vector = np.asarray(vector, dtype=np.float32)
        ids, sims = self.scored(vector)
        if exclude is not None:
            sims[ids == exclude] = -np.inf
        if min_sim is not None:
            cand = np.flatnonzero(sims >= min_sim)
        else:
            k = min(limit or len(sims), len(sims))
            cand = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
            cand = cand[np.isfinite(sims[cand])]
        cand = cand[np.argsort(-sims[cand], kind="stable")]
        if limit is not None:
            cand = cand[:limit]
        return [(int(ids[i]), float(sims[i])) for i in cand]

    def nearest_to_file(
        self,
        file_id: int,
        *,
        limit: int | None = 20,
        min_sim: float | None = None,
        exact: bool = False,
    ) -> list[tuple[int, float]]:
        vector = self.vector(file_id)
        return self.nearest(vector, limit=limit, min_sim=min_sim, exclude=file_id, exact=exact)

    def groups(
        self, min_sim: float, *, exhaustive: bool | None = None, block: int = 1024
    ) -> list[list[tuple[int, float]]]:
        """Connected groups of files with pairwise cosine >= min_sim.

        Below LSH_MIN_FILES (or with `exhaustive`) every pair is compared, O(n²); above, only
        pairs that random-projection LSH puts in one bucket (see lsh_pairs).
        """
        ids, matrix = self.ids, self.matrix
        if len(self.extra_ids) or len(self.hidden):  # a copy: open dupes' index unchanged
            keep = np.ones(len(ids), dtype=bool)
            keep[self.hidden] = False
            ids = np.concatenate([ids[keep], self.extra_ids])
            matrix = np.concatenate([np.asarray(matrix)[keep], self.extra])
        if exhaustive is None:
            exhaustive = matrix.shape[0] < LSH_MIN_FILES
        pairs = (
            exhaustive_pairs(matrix, min_sim, block) if exhaustive else lsh_pairs(matrix, min_sim)
        )
        return _connect(ids, pairs)


LSH_MIN_FILES = 20_000
LSH_RECALL = 0.99
BIG_BUCKET = 256  # pairs of a bucket this big come from one matrix product, not gathers


def lsh_plan(n: int, min_sim: float, recall: float = LSH_RECALL) -> tuple[int, int]:
    """(bits per band, bands) for sign-random-projection LSH over n vectors.

    A pair at angle θ agrees on one random hyperplane with p = 1 - θ/π, and shares a band of
    r bits with p^r; L bands catch it with 1 - (1 - p^r)^L >= recall. r ≈ log2(n) keeps
    buckets of unrelated vectors to a few files each.
    """
    theta = float(np.arccos(np.clip(min_sim, -1.0, 1.0)))
    p = 1.0 - theta / np.pi
    r = max(8, min(30, int(np.ceil(np.log2(max(n, 2)))) - 1))
    hit = p**r
    bands = 1 if hit >= 1.0 else int(np.ceil(np.log(1.0 - recall) / np.log1p(-hit)))
    return r, max(1, bands)


def lsh_pairs(
    matrix: np.ndarray,
    min_sim: float,
    *,
    recall: float = LSH_RECALL,
    seed: int = 0,
    chunk: int = CHUNK_ROWS,
    max_pairs: int = 1 << 18,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs at or above `min_sim` among those sharing a random-projection bucket.

    Every reported pair is checked exactly; a pair at exactly `min_sim` is found with
    probability >= `recall`, closer pairs with more. Seeded, so runs repeat.

    Gathering two full rows per candidate pair was most of the time (6.5M candidates at
    250k files: 53 GB read for 24 s), so candidates first pass a sketch test: all the bands'
    sign bits together estimate the pair's angle (differing bits ~ Binomial(bits, θ/π)),
    and a pair more than SKETCH_Z standard deviations past `min_sim`'s expectation is
    dropped before any row is read (a true pair is lost with p < 1e-4).
    """
    n, dim = matrix.shape
    bits, bands = lsh_plan(n, min_sim, recall)
    width = bits * bands
    planes = np.random.default_rng(seed).standard_normal((dim, width), dtype=np.float32)
    # Band codes as one product: the sign bits times their place values, exact in float64.
    place = np.zeros((width, bands), dtype=np.float64)
    for b in range(bands):
        place[b * bits : (b + 1) * bits, b] = 2.0 ** np.arange(bits)
    codes = np.empty((bands, n), dtype=np.int64)
    sketch = np.zeros((n, (width + 63) // 64 * 8), dtype=np.uint8)  # whole uint64 words
    for start in range(0, n, chunk):
        signs = (np.asarray(matrix[start : start + chunk]) @ planes) > 0
        codes[:, start : start + chunk] = (signs.astype(np.float64) @ place).T.astype(np.int64)
        packed = np.packbits(signs, axis=1)
        sketch[start : start + chunk, : packed.shape[1]] = packed
    words = sketch.view(np.uint64)
    q = float(np.arccos(np.clip(min_sim, -1.0, 1.0))) / np.pi
    most = int(np.floor(width * q + SKETCH_Z * np.sqrt(width * q * (1.0 - q)) + 1.0))

    def close(pa: np.ndarray, pc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        near = _differing(words[pa], words[pc]) <= most
        pa, pc = pa[near], pc[near]
        sims = np.einsum("ij,ij->i", matrix[pa], matrix[pc])
        keep = sims >= min_sim
        return np.minimum(pa, pc)[keep], np.maximum(pa, pc)[keep], sims[keep]

    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for b in range(bands):
        order = np.argsort(codes[b], kind="stable")
        sorted_codes = codes[b][order]
        edges = np.flatnonzero(np.diff(sorted_codes)) + 1
        starts = np.concatenate([[0], edges])
        sizes = np.diff(np.concatenate([starts, [n]]))
        big = sizes > BIG_BUCKET
        for first, size in zip(starts[big].tolist(), sizes[big].tolist(), strict=True):
            rows = np.sort(order[first : first + size])
            sub = np.asarray(matrix[rows])
            r, c = np.nonzero(np.triu(sub @ sub.T, 1) >= min_sim)
            found.append((rows[r], rows[c], np.einsum("ij,ij->i", sub[r], sub[c])))
        for size in np.unique(sizes[(sizes > 1) & (sizes <= BIG_BUCKET)]).tolist():
            runs = starts[sizes == size]
            members = order[runs[:, None] + np.arange(size)[None, :]]  # [buckets, size]
            ia, ib = np.triu_indices(size, 1)
            a = members[:, ia].ravel()
            c = members[:, ib].ravel()
            for s in range(0, len(a), max_pairs):
                found.append(close(a[s : s + max_pairs], c[s : s + max_pairs]))
    a, c, sims = concat_pairs(found)
    if len(a):
        _, first = np.unique(a * n + c, return_index=True)
        a, c, sims = a[first], c[first], sims[first]
    return a, c, sims


SKETCH_Z = 4.0
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _differing(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Differing bits per row of two uint64 arrays [rows, words]."""
    diff = x ^ y
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(diff).sum(axis=1, dtype=np.int64)
    return _POPCOUNT[diff.view(np.uint8)].sum(axis=1, dtype=np.int64)


def _connect(
    ids: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> list[list[tuple[int, float]]]:
    """Union-find over the pairs: groups of (file id, best cosine to another member)."""
    parent: dict[int, int] = {}
    best: dict[int, float] = {}

    def find(x: int) -> int:
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, c, s in zip(*(x.tolist() for x in pairs), strict=True):
        best[a] = max(best.get(a, 0.0), s)
        best[c] = max(best.get(c, 0.0), s)
        ra, rc = find(a), find(c)
        if ra != rc:
            parent[max(ra, rc)] = min(ra, rc)
    members: dict[int, list[int]] = {}
    for i in sorted(best):
        members.setdefault(find(i), []).append(i)
    return [
        [(int(ids[i]), float(best[i])) for i in rows]
        for rows in sorted(members.values(), key=lambda r: (-len(r), r[0]))
    ]


def _save(
    db_path: str | Path, model_id: int, ids: np.ndarray, mat: np.ndarray, sig: dict[str, object]
) -> None:
    """Both data files, then the meta naming them (sidecache.py); the replaced files and a
    cache of the old layout (`<db>.sim-N.npy`) are removed. An unwritable folder logs its
    reason once: every later `similar` would rebuild the matrix from SQLite."""
    kind = sim_kind(model_id)
    try:
        old = sidecache.read_meta(db_path, kind, SIM_FORMAT)
        ids_name = sidecache.write_data(
            db_path, kind, "ids.npy", functools.partial(_save_npy, arr=ids)
        )
        name = sidecache.write_data(db_path, kind, "npy", functools.partial(_save_npy, arr=mat))
        meta = {**sig, "format": SIM_FORMAT, "file": name, "ids": ids_name}
        sidecache.replace(db_path, kind, meta, None if old is None else old.get("file"))
    except OSError as exc:
        sidecache.not_written(kind, db_path, exc)
        return
    folder = Path(db_path).parent
    stale = [] if old is None else [str(old.get("ids"))]
    stale += [f"{Path(db_path).name}.{kind}.npy", f"{Path(db_path).name}.{kind}.ids.npy"]
    for leftover in stale:
        if leftover != ids_name:
            (folder / leftover).unlink(missing_ok=True)


def exact_duplicates(conn: sqlite3.Connection) -> list[tuple[str, list[str]]]:
    """(sha256, paths) for content stored under more than one live path."""
    out: dict[str, list[str]] = {}
    for sha, path in conn.execute(
        "SELECT f.sha256, p.path FROM paths p JOIN files f ON f.id = p.file_id "
        "WHERE p.missing = 0 AND p.file_id IN (SELECT file_id FROM paths WHERE missing = 0 "
        "GROUP BY file_id HAVING count(*) > 1) ORDER BY f.sha256, p.path"
    ):
        out.setdefault(sha, []).append(path)
    return list(out.items())


def paths_of(conn: sqlite3.Connection, file_ids: list[int]) -> dict[int, tuple[str, str]]:
    """file_id → (first live path, sha256)."""
    out: dict[int, tuple[str, str]] = {}
    for fid, path, sha in conn.execute(
        "SELECT p.file_id, min(p.path), f.sha256 FROM paths p JOIN files f ON f.id = p.file_id "
        "WHERE p.missing = 0 AND p.file_id IN (SELECT value FROM json_each(?)) "
        "GROUP BY p.file_id",
        (json.dumps(file_ids),),
    ):
        out[int(fid)] = (path, sha)
    return out


def listed(
    conn: sqlite3.Connection, found: list[tuple[int, float]], limit: int
) -> list[tuple[str, str, int, float]]:
    """(path, sha256, file id, cosine) of the nearest files that still have a live path,
    best first, at most `limit`: what `tagd similar` prints, whoever answers it."""
    where = paths_of(conn, [fid for fid, _ in found])
    return [(*where[fid], fid, sim) for fid, sim in found if fid in where][:limit]


def refresh_ann(
    conn: sqlite3.Connection,
    db_path: str | Path,
    *,
    min_files: int | None = None,
    at_once: bool = True,
    apart: bool = False,
) -> list[str]:
    """Per model with at least `min_files` embeddings: 'fresh', 'journaled N' (changed files
    appended to the journal), 'patched N' (the graph rewritten: enough changed to pay for
    it), 'built', 'skipped', or, without `at_once` (the daemon, every few seconds), 'pending
    N' while fewer than ann.APPEND_MIN_FILES wait and the journal was written under
    ann.APPEND_MAX_AGE_S ago; those files are read from SQLite meanwhile. With `apart` (the
    daemon), a patch or build runs in a process of its own (ann.apart)."""
    floor = ann.MIN_FILES if min_files is None else min_files
    out = []
    for model_id, name in conn.execute("SELECT id, name FROM models ORDER BY id").fetchall():
        n = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM embeddings WHERE model_id = ? LIMIT ?)",
            (model_id, max(1, floor)),
        ).fetchone()[0]
        if n < max(1, floor):
            continue
        with sidecache.locked(db_path, ann.kind(model_id)) as ok:
            if not ok:
                out.append(f"{name}: skipped")
                continue
            try:
                state = _refresh_one(conn, db_path, model_id, at_once, apart)
                out.append(f"{name}: {state}")
            except OSError as exc:
                sidecache.not_written(ann.kind(model_id), db_path, exc)
                out.append(f"{name}: skipped")
    return out


def _refresh_one(
    conn: sqlite3.Connection, db_path: str | Path, model_id: int, at_once: bool, apart: bool
) -> str:
    meta = sidecache.read_meta(db_path, ann.kind(model_id), ann.FORMAT)
    if meta is not None and sidecache.usable(meta, conn):
        seq = changes.current_seq(conn)
        if ann.journal_seq(meta) >= seq:
            return "fresh"
        dirty = changes.changed_since(conn, int(meta["seq"]), ann.DIRTY_MAX)
        if dirty is not None and len(dirty) < ann.merge_at(db_path, meta):
            new = changes.changed_since(conn, ann.journal_seq(meta), ann.DIRTY_MAX) or []
            written = meta.get("journal_at", meta.get("saved_at", 0))
            old = time.time() - float(written) >= ann.APPEND_MAX_AGE_S
            if not (at_once or old or len(new) >= ann.APPEND_MIN_FILES):
                return f"pending {len(new)}"
            done = ann.append(conn, db_path, meta)
            if done is not None:
                return f"journaled {done}"
        elif dirty is not None:
            if apart:
                done = ann.apart("patch", db_path, model_id)
            else:
                done = ann.patch(conn, db_path, model_id, meta)
            if done is not None:
                return f"patched {done}"
    if apart:
        ann.apart("build", db_path, model_id)
    else:
        ann.build(conn, db_path, model_id)
    return "built"


def stored_vector(conn: sqlite3.Connection, model_id: int, model: str, file_id: int) -> np.ndarray:
    """One file's embedding, normalised as the matrix rows are."""
    row = conn.execute(
        "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? AND file_id = ?",
        (model_id, file_id),
    ).fetchone()
    if row is None or row[2] != "float16" or len(row[3]) != 2 * int(row[1]):
        raise SimilarError(f"that file has no embedding from model {model!r} yet")
    return ann.unit(np.frombuffer(row[3], dtype="<f2").astype(np.float32))


def nearest_files(
    conn: sqlite3.Connection,
    db_path: str | Path | None,
    model: str | None,
    file_id: int,
    *,
    limit: int | None = 20,
    min_sim: float | None = None,
    exact: bool = False,
    exact_index: Any = None,
) -> list[tuple[int, float]]:
    """(file id, cosine) nearest to a file, best first: through the HNSW index when it is
    usable (every printed similarity exact; a neighbour may be missed), else, or with
    `exact`, the exact scan. `exact_index`: a callable giving a cached EmbeddingIndex."""
    if not exact and db_path is not None:
        found = through_index(conn, db_path, model, file_id, limit=limit, min_sim=min_sim)
        if found is not None:
            return found
    index = exact_index() if exact_index is not None else EmbeddingIndex.open(conn, db_path, model)
    return index.nearest_to_file(file_id, limit=limit, min_sim=min_sim)


def through_index(
    conn: sqlite3.Connection,
    db_path: str | Path,
    model: str | None,
    file_id: int,
    *,
    limit: int | None,
    min_sim: float | None,
) -> list[tuple[int, float]] | None:
    """nearest_files through the HNSW index, or None when it cannot answer (missing, stale,
    turned off, or a threshold too wide for it)."""
    model_id, name = pick_model(conn, model)
    if not ann.enabled():
        return None
    graph = ann.Ann.open(conn, db_path, model_id)
    if graph is None:
        return None
    vector = stored_vector(conn, model_id, name, file_id)
    if len(vector) != graph.dim:
        return None
    return graph.nearest(conn, vector, limit=limit, min_sim=min_sim, exclude=file_id)


def duplicate_groups(
    conn: sqlite3.Connection,
    db_path: str | Path | None,
    model: str | None,
    min_sim: float,
    *,
    use_index: bool = False,
    exhaustive: bool | None = None,
) -> list[list[tuple[int, float]]]:
    """Near-duplicate groups from the matrix (every pair, or LSH above LSH_MIN_FILES); with
    `use_index`, through the HNSW index when it is usable (every file's nearest DUPES_K,
    pairs verified exactly). Not the default: at 250k the index took 138 s and missed 3 of
    250 planted pairs where LSH took 27 s and found all (docs/performance-caches.md)."""
    model_id, _ = pick_model(conn, model)
    if use_index and not exhaustive and db_path is not None and ann.enabled():
        graph = ann.Ann.open(conn, db_path, model_id, lookups=True)
        if graph is not None and len(graph.dirty) <= DUPES_DIRTY_MAX:
            a, b, sims = graph.pairs(conn, min_sim)
            ids = np.unique(np.concatenate([a, b]))
            return _connect(ids, (np.searchsorted(ids, a), np.searchsorted(ids, b), sims))
        log.info("dupes: no usable similarity index; comparing the whole matrix")
    index = EmbeddingIndex.open(conn, db_path, model, changes_ok=False)
    return index.groups(min_sim, exhaustive=exhaustive)


def _save_npy(fh: Any, arr: np.ndarray) -> None:
    np.save(fh, arr)
