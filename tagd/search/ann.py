"""An HNSW index (usearch) beside the database for `similar`: top-k without a full scan.

The exact path (similar.EmbeddingIndex: one matrix-vector product over every embedding) reads
the whole matrix per query: 4 GiB at a million 1024-d files. The HNSW graph visits a few
thousand vectors instead. Candidates it returns are re-scored exactly from the stored
embeddings (read from SQLite by key: no matrix is loaded), so every reported similarity is
exact (to float32 rounding: a row's last bit depends on the batch it is multiplied in); what
the graph can do is miss a neighbour (recall, measured by bench/search_bench.py), and
`--exact` skips it.

On disk (tagd/index/sidecache.py's discipline): `<db>.ann-<model id>.json` (db id, change-log
seq, data file) and `<db>.ann-<model id>-<stamp>.usearch` (quantised vectors + graph,
memory-mapped as a view when queried). Files changed after the seq are excluded from the
graph's answers and scored exactly instead. Below MIN_FILES embeddings the exact scan is as
fast: no index.

A graph cannot be patched in place: usearch saves the whole file (1.24 GiB at a million
files). So changed files go first to an append-only journal beside it (`<data file>.journal`
and `.journal-keys`: their normalised rows, or a mark that the embedding is gone), which
queries score exactly, memory-mapped; the meta says how many records are valid and which seq
they reach, and files changed after that are read from SQLite. The graph is rewritten
(`patch`: remove + add) only when enough files changed to pay for it: its size /
WRITE_PER_CHANGE of them, at most JOURNAL_MAX so a query never scores more than that many
exactly. At a million files that is every ~5,000 changes instead of every minute (the
journal takes 4 KiB a file meanwhile); past DIRTY_MAX changed files (a long-stopped daemon)
the graph is rebuilt.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tagd.index import changes, sidecache
from tagd.search.vectors import exhaustive_pairs, normalise, read_chunks, read_rows

ENV = "TAGD_ANN"


def enabled() -> bool:
    """On unless TAGD_ANN=off, whenever usearch is importable (a core dependency; a broken
    or missing install falls back to the exact scan with one warning)."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    # Found, not imported (~0.1 s): a gallery without an index never pays for the import.
    if importlib.util.find_spec("usearch") is None:
        _warn_once("usearch is not installed: pip install usearch")
        return False
    return True


def _index_class() -> Any:
    """usearch's Index, or None (one warning) when the install is broken."""
    try:
        from usearch.index import Index
    except ImportError as exc:
        _warn_once(f"usearch cannot be imported ({exc})")
        return None
    return Index


@functools.cache
def _warn_once(message: str) -> None:
    logging.getLogger(__name__).warning("%s; using the exact scan", message)


# 3: M 32 / ef_construction 256 (format 2's M 16 / 128 reached recall@20 0.936 at 1M and
# 0.979 at 500k; 32 / 256 gives 1.000 at 500k), so an older index is rebuilt.
FORMAT = 3
MIN_FILES = 50_000
DIRTY_MAX = 100_000
DTYPE = "i8"
CONNECTIVITY = 32
EXPANSION_ADD = 256
EXPANSION_SEARCH = 512
OVERSAMPLE = 2
APPEND_MIN_FILES = 2_000  # fewer changed files wait for the journal (read from SQLite) ...
APPEND_MAX_AGE_S = 60.0  # ... at most this long
WRITE_PER_CHANGE = 256 * 1024  # bytes of graph rewrite each changed file may cost
JOURNAL_MAX = 8_192  # changed files that force a rewrite whatever the graph's size
DUPES_K = 8  # neighbours asked per file by `dupes`
DUPES_EF = 64  # its ef_search: 16 missed a planted cluster at 20k files
DUPES_MARGIN = 0.03  # quantised distances are approximate: verify pairs this far below
CHUNK = 16_384  # rows read per statement by a build
RANGE_MAX = 16_384  # a `similar:` threshold reaching past this many files: the exact scan


def kind(model_id: int) -> str:
    return f"ann-{model_id}"


def _new_index(dim: int) -> Any:
    from usearch.index import Index

    return Index(
        ndim=dim,
        metric="cos",
        dtype=DTYPE,
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
    meta = {**meta, "format": FORMAT, "file": name, "saved_at": time.time()}
    sidecache.replace(db_path, kind(model_id), meta, None if old is None else old.get("file"))


def _chunks(conn: sqlite3.Connection, model_id: int, dim: int) -> Iterator[tuple[Any, Any]]:
    """(ids, normalised rows) of the model's embeddings, a chunk at a time: no full matrix,
    and no read transaction held for the whole build (the daemon goes on writing)."""
    last = -1
    while True:
        cur = conn.execute(
            "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? "
            "AND file_id > ? ORDER BY file_id LIMIT ?",
            (model_id, last, CHUNK),
        )
        rows = cur.fetchall()
        if not rows:
            return
        last = int(rows[-1][0])
        yield from read_chunks(iter([rows]), dim, len(rows))


def build(conn: sqlite3.Connection, db_path: str | Path, model_id: int) -> int:
    """A fresh graph over the model's embeddings; returns how many it holds.

    The seq is read before the rows, so a file changed during the build is logged after it
    and taken in again by the next patch."""
    dim = conn.execute(
        "SELECT max(dim) FROM embeddings WHERE model_id = ?", (model_id,)
    ).fetchone()[0]
    if dim is None:
        return 0
    seq, ident = changes.current_seq(conn), changes.db_id(conn)
    index = _new_index(int(dim))
    for ids, rows in _chunks(conn, model_id, int(dim)):
        index.add(ids.astype(np.uint64), rows, threads=_threads())
    meta = {"db_id": ident, "seq": seq, "model_id": model_id, "dim": int(dim)}
    meta["built_at"] = time.time()
    _save(db_path, model_id, index, meta)
    return len(index)


def merge_at(db_path: str | Path, meta: dict[str, Any]) -> int:
    """How many changed files pay for rewriting the graph: its size / WRITE_PER_CHANGE,
    at most JOURNAL_MAX (0: a graph too small to be worth a journal)."""
    try:
        size = (Path(db_path).parent / str(meta["file"])).stat().st_size
    except OSError:
        return 0
    return min(JOURNAL_MAX, size // WRITE_PER_CHANGE)


def journal_seq(meta: dict[str, Any]) -> int:
    """The seq the graph and its journal reach together."""
    return max(int(meta["seq"]), int(meta.get("journal_seq", 0)))


def append(conn: sqlite3.Connection, db_path: str | Path, meta: dict[str, Any]) -> int | None:
    """Journal the files changed since the journal's seq; None when too many changed.

    Two files grow together: `<graph>.journal` (float32 rows, contiguous: a query multiplies
    them where they are mapped, without a copy) and
    `<graph>.journal-keys` (int64 file ids, negated where the embedding is gone). Records
    past the meta's count (a writer killed before its meta) are cut off first; readers only
    read counted records, so none sees a partial one."""
    seq = changes.current_seq(conn)
    new = changes.changed_since(conn, journal_seq(meta), DIRTY_MAX)
    if new is None:
        return None
    dim = int(meta["dim"])
    ids, rows = rows_of(conn, int(meta["model_id"]), new, dim)
    dropped = np.setdiff1d(np.asarray(new, dtype=np.int64), ids)
    keys = np.concatenate([ids, -dropped]).astype("<i8")
    rows = np.concatenate([rows, np.zeros((len(dropped), dim), np.float32)]).astype("<f4")
    name = str(meta.get("journal") or f"{meta['file']}.journal")
    count = int(meta.get("journal_rows", 0)) if meta.get("journal") else 0
    folder = Path(db_path).parent
    _grow(folder / name, count * dim * 4, rows.tobytes(), db_path)
    _grow(folder / f"{name}-keys", count * 8, keys.tobytes(), db_path)
    meta = {**meta, "journal": name, "journal_keys": f"{name}-keys", "journal_seq": seq}
    meta |= {"journal_rows": count + len(keys), "journal_at": time.time()}
    sidecache.write_meta(db_path, kind(int(meta["model_id"])), meta)
    return len(new)


def _grow(path: Path, valid: int, data: bytes, db_path: str | Path) -> None:
    """Cut the file to its `valid` bytes, append `data`, and make it durable."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, sidecache.folder_mode(db_path))
    try:
        os.ftruncate(fd, valid)
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, valid)
            valid += done
            view = view[done:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _journal(folder: Path, meta: dict[str, Any], dim: int) -> tuple[Any, Any, Any] | None:
    """(file ids, live flags, rows) of the journal's latest record per file, or None when its
    files cannot be read as the meta describes them (its files are then read from SQLite)."""
    count = int(meta.get("journal_rows", 0))
    if not meta.get("journal") or count == 0:
        return np.empty(0, np.int64), np.empty(0, bool), np.empty((0, dim), np.float32)
    try:
        keys = np.fromfile(folder / str(meta["journal_keys"]), "<i8", count)
        rows = np.memmap(folder / str(meta["journal"]), "<f4", "r", shape=(count, dim))
    except (OSError, ValueError, KeyError):
        return None
    if len(keys) != count:
        return None
    ids = np.abs(keys)
    first = np.unique(ids[::-1], return_index=True)[1]
    if len(first) == count:  # each file once: the rows stay mapped
        return ids, keys > 0, rows
    last = np.sort(count - 1 - first)
    return ids[last], keys[last] > 0, np.asarray(rows[last])


def patch(
    conn: sqlite3.Connection,
    db_path: str | Path,
    model_id: int,
    meta: dict[str, Any],
    dirty: list[int] | None = None,
) -> int | None:
    """Rewrite the graph with the files changed since its seq (read from SQLite, the journal
    is not needed) and start an empty journal; None when a rebuild is due. `dirty` (the
    bench) names the files instead of the change log."""
    from usearch.index import Index

    seq = changes.current_seq(conn)
    if dirty is None:
        dirty = changes.changed_since(conn, int(meta["seq"]), DIRTY_MAX)
        if dirty is None:
            return None
    index = Index.restore(str(Path(db_path).parent / meta["file"]))
    if index is None:
        return None
    ids, rows = rows_of(conn, model_id, dirty, int(meta["dim"]))
    present = [k for k in dirty if index.contains(k)]
    if present:
        index.remove(np.asarray(present, dtype=np.uint64))
    if len(ids):
        index.add(ids.astype(np.uint64), rows, threads=_threads())
    kept = {k: v for k, v in meta.items() if not k.startswith("journal")}
    _save(db_path, model_id, index, {**kept, "seq": seq})
    return len(dirty)


def apart(op: str, db_path: str | Path, model_id: int) -> int | None:
    """`patch` or `build` in a process of its own, as the daemon runs them: usearch holds the
    interpreter while it loads or saves a whole graph (3.1 s and 1.5 s at 1M, measured), which
    froze every other thread of the daemon (the pipeline's store, the query socket). The child
    inherits the calling thread's nice value. OSError (one line) when it fails."""
    cmd = [sys.executable, "-m", "tagd.search.ann", op, str(db_path), str(model_id)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise OSError(f"{op} of the similar index failed: {last}")
    last = (done.stdout.strip().splitlines() or ["none"])[-1]  # the child's result line
    return int(last) if last.isdigit() else None


def _child(argv: list[str]) -> int:
    """The process `apart` starts: one patch or build, its result on stdout."""
    from tagd.index.db import connect

    op, db_path, model_id = argv[0], argv[1], int(argv[2])
    conn = connect(db_path, readonly=True)
    try:
        if op == "build":
            print(build(conn, db_path, model_id))
            return 0
        meta = sidecache.read_meta(db_path, kind(model_id), FORMAT)
        done = None if meta is None else patch(conn, db_path, model_id, meta)
        print("none" if done is None else done)
        return 0
    finally:
        conn.close()


def rows_of(
    conn: sqlite3.Connection, model_id: int, file_ids: list[int] | np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """(file ids that have an embedding, their normalised rows), read from SQLite by key."""
    keys = [int(k) for k in np.unique(np.asarray(file_ids, dtype=np.int64))]
    if not keys:
        return np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32)
    cur = conn.execute(
        "SELECT file_id, dim, dtype, vector FROM embeddings WHERE model_id = ? "
        "AND file_id IN (SELECT value FROM json_each(?)) ORDER BY file_id",
        (model_id, json.dumps(keys)),
    )
    return read_rows(cur, len(keys), dim)


_views: dict[str, Any] = {}
_views_lock = threading.Lock()


def _view(path: Path, lookups: bool = False) -> Any:
    """The data file as a memory-mapped view, kept for the process: usearch walks the whole
    file to open a view, which a web server or a search with several `similar:` terms
    should pay once. Data files are never rewritten in place (a new stamp each save), so a
    kept view of a name that still exists is current.

    Without `lookups` (a query: it only searches) usearch builds no key-to-node table, the
    most of the opening cost (250k files: 12 ms instead of 32 ms); `dupes` reads vectors by
    key and asks for it."""
    key = str(path)
    with _views_lock:
        if not path.exists():
            _views.pop(key, None)
            _views.pop(key + "+keys", None)
            return None
        name = key + "+keys" if lookups else key
        index = _views.get(name)
        if index is None and not lookups:  # a view with the key table answers queries too
            index = _views.get(key + "+keys")
        if index is not None:
            return index
        Index = _index_class()
        if Index is None:
            return None
        try:
            meta = Index.metadata(key)
            if meta is None:
                return None
            index = Index(
                ndim=int(meta["dimensions"]),
                metric=meta["kind_metric"],
                dtype=meta["kind_scalar"],
                enable_key_lookups=lookups,
            )
            index.view(key)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError):
            return None
        family = key.rsplit("-", 1)[0]
        for old in [k for k in _views if k.rsplit("-", 1)[0] == family]:
            del _views[old]
        _views[name] = index
        return index


@dataclass
class Ann:
    """An open, usable index: the graph as a memory-mapped view, the files changed since
    (left out of its answers), and where their current rows come from: the journal for those
    it holds, SQLite for the files changed after it (`late`)."""

    index: Any
    model_id: int
    dim: int
    dirty: set[int]
    _gone: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _journal: tuple[Any, Any, Any] | None = None
    _late: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    _rows: list[tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def open(
        cls, conn: sqlite3.Connection, db_path: str | Path, model_id: int, lookups: bool = False
    ) -> Ann | None:
        """None when missing, of another database, newer than it, or too far behind;
        `lookups` for `pairs`, which reads vectors by key."""
        meta = sidecache.read_meta(db_path, kind(model_id), FORMAT)
        if meta is None or not sidecache.usable(meta, conn):
            return None
        dirty = changes.changed_since(conn, int(meta["seq"]), DIRTY_MAX)
        if dirty is None:
            return None
        folder = Path(db_path).parent
        index = _view(folder / str(meta["file"]), lookups)
        if index is None or index.ndim != int(meta["dim"]):
            return None
        index.expansion_search = EXPANSION_SEARCH
        gone = np.asarray(sorted(dirty), dtype=np.int64)
        journal = _journal(folder, meta, int(meta["dim"])) if dirty else None
        late = gone
        if journal is not None:
            after = changes.changed_since(conn, journal_seq(meta), DIRTY_MAX) or []
            late = np.asarray(sorted(set(after) & set(dirty)), dtype=np.int64)
        return cls(index, model_id, int(meta["dim"]), set(dirty), gone, journal, late)

    def changed(self, conn: sqlite3.Connection) -> tuple[np.ndarray, np.ndarray]:
        """(ids, normalised rows) of the changed files that have an embedding now."""
        parts = self._changed(conn)
        return np.concatenate([i for i, _ in parts]), np.concatenate([r for _, r in parts])

    def _changed(self, conn: sqlite3.Connection) -> list[tuple[np.ndarray, np.ndarray]]:
        """SQLite's rows of the files changed after the journal, then the journal's records
        of the others (left memory-mapped: thousands of rows are not copied per query)."""
        if self._rows is None:
            parts = [rows_of(conn, self.model_id, self._late, self.dim)]
            if self._journal is not None:
                j_ids, live, j_rows = self._journal
                keep = live & ~np.isin(j_ids, self._late)
                if not keep.all():
                    j_ids, j_rows = j_ids[keep], j_rows[keep]
                parts.append((j_ids, j_rows))
            self._rows = parts
        return self._rows

    def candidates(self, vector: np.ndarray, k: int, own: int | None = None) -> np.ndarray:
        """Up to k * OVERSAMPLE file ids the graph finds nearest, changed files left out.

        `own` is the file whose stored vector is the query: the graph must find it first. A
        graph search that misses it has started outside an island the graph cannot reach
        (near-duplicates can keep links only to each other), so the query is answered by
        usearch's exhaustive scan of the index's vectors instead: slower, still no matrix."""
        vector = np.asarray(vector, dtype=np.float32)
        want = k * OVERSAMPLE + 1
        exact = False
        while True:
            found = self.index.search(vector, min(want, len(self.index)), exact=exact)
            keys = np.asarray(found.keys, dtype=np.int64)
            if own is not None and not exact and own not in self.dirty and own not in keys:
                exact = True
                continue
            kept = keys[~np.isin(keys, self._gone)] if len(self._gone) else keys
            if len(kept) > k or len(keys) >= len(self.index):
                return kept
            want *= 4

    def _scored(
        self, conn: sqlite3.Connection, vector: np.ndarray, keys: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine of the graph's candidates and of every changed file."""
        vector = np.asarray(vector, dtype=np.float32)
        parts = [rows_of(conn, self.model_id, keys, self.dim), *self._changed(conn)]
        return np.concatenate([i for i, _ in parts]), np.concatenate([r @ vector for _, r in parts])

    def nearest(
        self,
        conn: sqlite3.Connection,
        vector: np.ndarray,
        *,
        limit: int | None,
        min_sim: float | None = None,
        exclude: int | None = None,
    ) -> list[tuple[int, float]] | None:
        """(file id, exact cosine) best first; None when the graph cannot answer (no limit and
        no threshold, or a threshold reaching past RANGE_MAX files): scan exactly then."""
        if limit is None and min_sim is None:
            return None
        k = limit if limit is not None else 64
        while True:
            ids, sims = self._scored(conn, vector, self.candidates(vector, k + 1, exclude))
            if exclude is not None:
                sims[ids == exclude] = -np.inf
            if limit is not None:
                break
            # A threshold: ask for more until the graph's farthest answer is below it.
            graph = ~np.isin(ids, self._gone) & np.isfinite(sims)  # not the query itself
            if not graph.any() or sims[graph].min() < float(min_sim or 0.0):
                break
            if k >= min(len(self.index), RANGE_MAX):
                return None if k < len(self.index) else _ranked(ids, sims, limit, min_sim)
            k *= 4
        return _ranked(ids, sims, limit, min_sim)

    def pairs(
        self, conn: sqlite3.Connection, min_sim: float, *, batch: int = 16_384
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file a, file b, exact cosine) of pairs >= min_sim among every file's DUPES_K graph
        neighbours, each file's changed embedding from SQLite asked as well."""
        keys = np.asarray(self.index.keys, dtype=np.int64)
        keys = keys[~np.isin(keys, self._gone)]
        self.index.expansion_search = DUPES_EF
        cut = 1.0 - min_sim + DUPES_MARGIN
        found_a: list[np.ndarray] = []
        found_b: list[np.ndarray] = []
        try:
            for start in range(0, len(keys), batch):
                part = keys[start : start + batch]
                vecs = np.asarray(self.index.get(part.astype(np.uint64), dtype=np.float32))
                a, b = self._close(part, vecs, cut)
                found_a.append(a)
                found_b.append(b)
            d_ids, d_rows = self.changed(conn)
            if len(d_ids):
                a, b = self._close(d_ids, d_rows, cut, own=False)
                found_a.append(a)
                found_b.append(b)
                ra, rb, _ = exhaustive_pairs(d_rows, min_sim - DUPES_MARGIN)
                found_a.append(d_ids[ra])
                found_b.append(d_ids[rb])
        finally:
            self.index.expansion_search = EXPANSION_SEARCH
        a = np.concatenate(found_a) if found_a else np.empty(0, dtype=np.int64)
        b = np.concatenate(found_b) if found_b else np.empty(0, dtype=np.int64)
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        uniq = np.unique(np.stack([lo, hi], axis=1), axis=0) if len(lo) else np.empty((0, 2))
        return self._verified(conn, uniq.astype(np.int64), min_sim)

    def _close(
        self, keys: np.ndarray, vecs: np.ndarray, cut: float, own: bool = True
    ) -> tuple[Any, Any]:
        """(query key, neighbour key) of graph neighbours within distance `cut`. With `own`
        (each query is its key's stored vector), a query that does not find itself is in an
        island the graph cannot reach (see `candidates`): asked again exhaustively."""
        width = DUPES_K + 1
        nkeys, dist, counts = _table(self.index.search(vecs, width, threads=_threads()), width)
        if own:
            lost = np.flatnonzero(~(nkeys == keys[:, None]).any(axis=1))
            if len(lost):
                again = self.index.search(vecs[lost], width, threads=_threads(), exact=True)
                nkeys[lost], dist[lost], counts[lost] = _table(again, width)
        ok = (dist <= cut) & (np.arange(nkeys.shape[1])[None, :] < counts)
        ok &= nkeys != keys[:, None]
        if len(self._gone):
            ok &= ~np.isin(nkeys, self._gone)
        r, c = np.nonzero(ok)
        return keys[r], nkeys[r, c]

    def _verified(
        self, conn: sqlite3.Connection, pairs: np.ndarray, min_sim: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The pairs whose exact cosine (stored embeddings) is >= min_sim."""
        empty = np.empty(0, dtype=np.int64)
        if not len(pairs):
            return empty, empty, np.empty(0, dtype=np.float32)
        ids, rows = rows_of(conn, self.model_id, pairs.ravel(), self.dim)
        ia = np.searchsorted(ids, pairs[:, 0])
        ib = np.searchsorted(ids, pairs[:, 1])
        ia, ib = np.minimum(ia, len(ids) - 1), np.minimum(ib, len(ids) - 1)
        real = (ids[ia] == pairs[:, 0]) & (ids[ib] == pairs[:, 1])
        sims = np.einsum("ij,ij->i", rows[ia], rows[ib])
        keep = real & (sims >= min_sim)
        return pairs[keep, 0], pairs[keep, 1], sims[keep].astype(np.float32)


def _table(found: Any, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, distances, counts) of a usearch answer as [queries, width] arrays: one query
    comes back as Matches (its found count alone), more as BatchMatches."""
    keys = np.asarray(found.keys, dtype=np.int64)
    dist = np.asarray(found.distances, dtype=np.float32)
    if keys.ndim == 1:
        n = len(keys)
        keys = np.pad(keys, (0, width - n))[None, :]
        dist = np.pad(dist, (0, width - n), constant_values=np.inf)[None, :]
        return keys, dist, np.array([[n]])
    return keys, dist, np.asarray(found.counts).reshape(-1, 1).copy()


def _ranked(
    ids: np.ndarray, sims: np.ndarray, limit: int | None, min_sim: float | None
) -> list[tuple[int, float]]:
    keep = np.isfinite(sims)
    if min_sim is not None:
        keep &= sims >= min_sim
    ids, sims = ids[keep], sims[keep]
    order = np.lexsort((ids, -sims))
    if limit is not None:
        order = order[:limit]
    return [(int(ids[i]), float(sims[i])) for i in order]


def unit(vector: np.ndarray) -> np.ndarray:
    return normalise(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1:]))
