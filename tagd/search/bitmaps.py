"""Posting lists as Roaring bitmaps beside the database: counts without visiting every match.

`--count` through SQLite visits every matching row (seconds for `1girl solo long_hair` at a
million files). Here every tag has a bitmap of the files any model selected it for, every
namespace one of the files with any selected tag in it (`character:*`), and the present
files are kept in layers: layer k holds the files with more than k present paths, so the
number of matching paths (what `--count` counts) is the sum of the result's intersection
cardinalities with the layers. AND/OR/NOT, wildcards and ratings evaluate on the bitmaps.
An AND that also has confidence, file-attribute or path terms gives its bitmap terms'
result as the candidate set, and SQLite checks the whole query on those candidates only.
Queries with `model:`, `untagged` or `failed` (which also read the job queue), or an OR/NOT
over non-bitmap terms, are left to SQLite.

On disk (tagd/sidecache.py's discipline): `<db>.bitmaps.json` (db id, change-log seq,
directory of offsets) and `<db>.bitmaps-<stamp>.roar` (the serialized bitmaps, memory-mapped,
each deserialized only when a query names it). Files changed after the seq (scores,
embeddings, and since migration 0014 their paths) are taken out of every bitmap result and
checked in SQLite instead, so a stale cache costs time, never correctness; `refresh` patches
them in, or rebuilds when too many changed.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import json
import mmap
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pyroaring import BitMap, FrozenBitMap

from tagd.index import changes, sidecache
from tagd.search.query import And, FileFilter, Node, Not, Or, Rating, Tag, walk

# SQL for a tag term's tag ids, and for counting the query over a JSON list of file ids.
TagSql = Callable[[Tag], tuple[str, Sequence[object]]]
CountSql = Callable[[str], tuple[str, Sequence[object]]]

if TYPE_CHECKING:
    import numpy as np

KIND = "bitmaps"
FORMAT = 1
DIRTY_MAX = 20_000
CANDIDATES_MAX = 100_000
REBUILD_AFTER_S = 24 * 3600


def _bitmap(ids: np.ndarray) -> BitMap:
    import numpy as np

    return BitMap(array.array("I", np.asarray(ids, dtype=np.uint32).tobytes()))


@dataclass
class Cache:
    """An open cache: the memory-mapped data file, its directory read in place (no parsing:
    a query costs the bitmaps it names, not the number of tags)."""

    meta: dict[str, Any]
    data: mmap.mmap | bytes
    tag_ids: memoryview  # sorted int64
    offsets: memoryview  # int64, one more than the bitmaps, relative to `base`
    base: int
    namespaces: dict[str, int]  # namespace -> bitmap number
    n_layers: int
    _loaded: dict[int, FrozenBitMap] = field(default_factory=dict)

    @classmethod
    def open(cls, db_path: str | Path, meta: dict[str, Any] | None = None) -> Cache | None:
        meta = meta or sidecache.read_meta(db_path, KIND, FORMAT)
        if meta is None:
            return None
        try:
            n_tags, names = int(meta["n_tags"]), [str(n) for n in meta["namespaces"]]
            n_layers = int(meta["n_layers"])
            n_maps = n_tags + len(names) + n_layers
            base = 8 * (n_tags + n_maps + 1)
            path = Path(db_path).parent / str(meta["file"])
            with open(path, "rb") as fh:
                size = fh.seek(0, 2)
                if size < base:
                    return None
                data: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            view = memoryview(data)
            tag_ids = view[: 8 * n_tags].cast("q")
            offsets = view[8 * n_tags : base].cast("q")
            if base + offsets[-1] != size:
                return None
            ns = {n: n_tags + i for i, n in enumerate(names)}
            return cls(meta, data, tag_ids, offsets, base, ns, n_layers)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def get(self, number: int | None) -> FrozenBitMap:
        if number is None:
            return FrozenBitMap()
        found = self._loaded.get(number)
        if found is None:
            lo, hi = self.base + self.offsets[number], self.base + self.offsets[number + 1]
            found = FrozenBitMap.deserialize(self.data[lo:hi])
            self._loaded[number] = found
        return found

    @property
    def tags(self) -> list[int]:
        return self.tag_ids.tolist()

    def tag(self, tag_id: int) -> FrozenBitMap:
        i = bisect.bisect_left(self.tag_ids, tag_id)
        found = i < len(self.tag_ids) and self.tag_ids[i] == tag_id
        return self.get(i if found else None)

    def namespace(self, ns: str) -> FrozenBitMap:
        return self.get(self.namespaces.get(ns))

    def layer(self, k: int) -> FrozenBitMap:
        if k >= self.n_layers:
            return FrozenBitMap()
        return self.get(len(self.tag_ids) + len(self.namespaces) + k)

    @property
    def present(self) -> FrozenBitMap:
        return self.layer(0)

    def paths_in(self, files: BitMap | FrozenBitMap) -> int:
        """Present paths of `files`: one per layer a file is in."""
        total = 0
        for k in range(self.n_layers):
            n = files.intersection_cardinality(self.layer(k))
            if not n:
                break
            total += n
        return total


# ---- building and patching ---------------------------------------------------------------


def _serialize(
    tags: dict[int, BitMap], namespaces: dict[str, BitMap], layers: list[BitMap]
) -> tuple[list[int], list[str], list[bytes]]:
    tag_ids = sorted(t for t, b in tags.items() if b)
    ns = sorted(n for n, b in namespaces.items() if b)
    blobs = [tags[t].serialize() for t in tag_ids]
    blobs += [namespaces[n].serialize() for n in ns]
    blobs += [b.serialize() for b in layers if b]
    return tag_ids, ns, blobs


def _write(
    conn: sqlite3.Connection,
    db_path: str | Path,
    seq: int,
    ident: str,
    built_at: float,
    tags: dict[int, BitMap],
    namespaces: dict[str, BitMap],
    layers: list[BitMap],
) -> dict[str, Any]:
    """Data file: int64 tag ids, int64 offsets, then the serialized bitmaps in that order."""
    tag_ids, ns, blobs = _serialize(tags, namespaces, layers)
    offsets = [0]
    for b in blobs:
        offsets.append(offsets[-1] + len(b))

    def write(fh: IO[bytes]) -> None:
        fh.write(array.array("q", tag_ids).tobytes())
        fh.write(array.array("q", offsets).tobytes())
        for b in blobs:
            fh.write(b)

    old = sidecache.read_meta(db_path, KIND, FORMAT)
    name = sidecache.write_data(db_path, KIND, "roar", write)
    meta = {
        "format": FORMAT,
        "db_id": ident,
        "seq": seq,
        "built_at": built_at,
        "file": name,
        "n_tags": len(tag_ids),
        "namespaces": ns,
        "n_layers": len(blobs) - len(tag_ids) - len(ns),
    }
    sidecache.replace(db_path, KIND, meta, None if old is None else old.get("file"))
    return meta


def _layers_from(counts: Iterable[tuple[int, int]]) -> list[BitMap]:
    """Layer k = files with more than k present paths."""
    import numpy as np

    rows = np.asarray(list(counts), dtype=np.int64).reshape(-1, 2)
    layers: list[BitMap] = []
    k = 0
    while True:
        ids = rows[rows[:, 1] > k, 0]
        if not len(ids):
            return layers
        layers.append(_bitmap(np.sort(ids)))
        k += 1


def build(conn: sqlite3.Connection, db_path: str | Path) -> dict[str, Any]:
    """Every bitmap from one read snapshot (callers hold the lock); returns the new meta."""
    import numpy as np

    conn.execute("BEGIN")
    try:
        seq, ident = changes.current_seq(conn), changes.db_id(conn)
        ns_of = {int(i): str(n) for i, n in conn.execute("SELECT id, namespace FROM tags")}
        tags: dict[int, BitMap] = {}
        namespaces: dict[str, BitMap] = {}
        cur = conn.execute(
            "SELECT tag_id, file_id FROM scores INDEXED BY scores_by_tag "
            "WHERE selected = 1 ORDER BY tag_id"
        )
        pending: list[np.ndarray] = []
        current: int | None = None

        def flush() -> None:
            if current is None or not pending:
                return
            bm = _bitmap(np.concatenate(pending))
            tags[current] = bm
            namespaces.setdefault(ns_of.get(current, ""), BitMap()).update(bm)

        while chunk := cur.fetchmany(262_144):
            arr = np.asarray(chunk, dtype=np.int64)
            cuts = np.flatnonzero(np.diff(arr[:, 0])) + 1
            for part in np.split(arr, cuts):
                tag = int(part[0, 0])
                if tag != current:
                    flush()
                    current, pending = tag, []
                pending.append(part[:, 1])
        flush()
        layers = _layers_from(
            conn.execute(
                "SELECT file_id, count(*) FROM paths WHERE missing = 0 AND file_id IS NOT NULL "
                "GROUP BY file_id"
            )
        )
    finally:
        conn.execute("COMMIT")
    return _write(conn, db_path, seq, ident, time.time(), tags, namespaces, layers)


def patch(conn: sqlite3.Connection, db_path: str | Path, cache: Cache) -> int | None:
    """Take the files changed since the cache's seq in; None when only a rebuild can."""
    conn.execute("BEGIN")
    try:
        seq = changes.current_seq(conn)
        dirty = changes.changed_since(conn, int(cache.meta["seq"]), DIRTY_MAX)
        if dirty is None:
            return None
        listed = json.dumps(dirty)
        ns_of = {int(i): str(n) for i, n in conn.execute("SELECT id, namespace FROM tags")}
        rows = conn.execute(
            "SELECT tag_id, file_id FROM scores "
            "WHERE file_id IN (SELECT value FROM json_each(?)) AND selected = 1",
            (listed,),
        ).fetchall()
        counts = conn.execute(
            "SELECT file_id, count(*) FROM paths WHERE missing = 0 "
            "AND file_id IN (SELECT value FROM json_each(?)) GROUP BY file_id",
            (listed,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    gone = BitMap(dirty)
    tags = {t: BitMap(cache.get(i)) for i, t in enumerate(cache.tags)}
    namespaces = {n: BitMap(cache.namespace(n)) for n in cache.namespaces}
    layers = [BitMap(cache.layer(k)) for k in range(cache.n_layers)]
    for bm in [*tags.values(), *namespaces.values(), *layers]:
        if not bm.isdisjoint(gone):
            bm.difference_update(gone)
    for tag, fid in rows:
        tags.setdefault(int(tag), BitMap()).add(int(fid))
        namespaces.setdefault(ns_of.get(int(tag), ""), BitMap()).add(int(fid))
    for k, bm in enumerate(_layers_from(counts)):
        if k == len(layers):
            layers.append(BitMap())
        layers[k].update(bm)
    ident, built_at = str(cache.meta["db_id"]), float(cache.meta["built_at"])
    _write(conn, db_path, seq, ident, built_at, tags, namespaces, layers)
    return len(dirty)


def refresh(
    conn: sqlite3.Connection, db_path: str | Path, *, max_age_s: float = REBUILD_AFTER_S
) -> str:
    """Patch or rebuild as needed: 'fresh', 'patched N', 'built' or 'skipped'."""
    with sidecache.locked(db_path, KIND) as ok:
        if not ok:
            return "skipped"
        try:
            meta = sidecache.read_meta(db_path, KIND, FORMAT)
            cache = None if meta is None else Cache.open(db_path, meta)
            if (
                cache is not None
                and sidecache.usable(cache.meta, conn)
                and time.time() - float(cache.meta["built_at"]) < max_age_s
            ):
                if int(cache.meta["seq"]) == changes.current_seq(conn):
                    return "fresh"
                n = patch(conn, db_path, cache)
                if n is not None:
                    return f"patched {n}"
            build(conn, db_path)
            return "built"
        except OSError as exc:
            sidecache.not_written(KIND, db_path, exc)
            return "skipped"


# ---- evaluation ---------------------------------------------------------------------------


class _Unsupported(Exception):
    pass


class Evaluator:
    """Evaluates the bitmap part of a query tree; raises _Unsupported for anything else."""

    def __init__(self, conn: sqlite3.Connection, cache: Cache, tag_sql: TagSql) -> None:
        self.conn = conn
        self.cache = cache
        self.tag_sql = tag_sql

    def tag_ids(self, term: Tag) -> list[int]:
        sql, params = self.tag_sql(term)
        return [int(r[0]) for r in self.conn.execute(sql, params)]

    def eval(self, node: Node) -> BitMap | FrozenBitMap:
        cache = self.cache
        if isinstance(node, Tag):
            if node.wildcard and not node.name.strip("*"):
                if node.namespace is not None:
                    return cache.namespace(node.namespace)
                return BitMap.union(*(cache.namespace(n) for n in cache.namespaces))
            ids = self.tag_ids(node)
            if len(ids) == 1:
                return cache.tag(ids[0])
            return BitMap.union(BitMap(), *(cache.tag(t) for t in ids))
        if isinstance(node, Rating):
            marks = ", ".join("?" * len(node.names))
            ids = [
                int(r[0])
                for r in self.conn.execute(
                    f"SELECT id FROM tags WHERE namespace = 'rating' AND name IN ({marks})",
                    list(node.names),
                )
            ]
            return BitMap.union(BitMap(), *(cache.tag(t) for t in ids))
        if isinstance(node, Not):
            return cache.present - self.eval(node.term)
        if isinstance(node, FileFilter) and node.key == "path" and node.text == "*":
            return cache.present  # the web UI's empty query: every file with a present path
        if isinstance(node, And):
            parts = sorted((self.eval(t) for t in node.terms), key=len)
            return BitMap.intersection(*parts) if len(parts) > 1 else parts[0]
        if isinstance(node, Or):
            return BitMap.union(BitMap(), *(self.eval(t) for t in node.terms))
        raise _Unsupported(type(node).__name__)

    def candidates(self, node: Node) -> tuple[BitMap | FrozenBitMap, bool]:
        """(files that may match, exact?): the whole tree, or an AND's bitmap terms."""
        try:
            return self.eval(node), True
        except _Unsupported:
            if not isinstance(node, And):
                raise
        parts = []
        for term in node.terms:
            try:
                parts.append(self.eval(term))
            except _Unsupported:
                continue
        if not parts:
            raise _Unsupported("no bitmap term")
        return BitMap.intersection(*parts) if len(parts) > 1 else parts[0], False


def _needs_sqlite_only(node: Node) -> bool:
    from tagd.search.query import Flag, Model

    return any(isinstance(n, Flag | Model) for n in walk(node))


def _paths_logged(conn: sqlite3.Connection) -> bool:
    """Migration 0014: without it a moved or deleted image never reaches the change log."""
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = 'paths_log_update'"
    ).fetchone()
    return found is not None


@dataclass
class Candidates:
    """What the bitmaps say about a query, read in one snapshot with the change log."""

    cache: Cache
    found: BitMap | FrozenBitMap  # the files that may match: exactly those when `exact`
    exact: bool
    dirty: list[int]  # files changed since the build: the bitmaps say nothing of them


@contextlib.contextmanager
def candidates(
    conn: sqlite3.Connection, db_path: str, node: Node, tag_sql: TagSql
) -> Iterator[Candidates | None]:
    """The query's candidates, None when the bitmaps cannot serve it; the read transaction
    stays open for the caller's SQL, so its rows and the dirty list are of one snapshot.

    The meta is read before the transaction starts, so the snapshot is at least as new as
    the bitmaps and every file changed in between is in the change log it reads."""
    found = None
    meta = None
    if not _needs_sqlite_only(node) and changes.logged(conn) and _paths_logged(conn):
        meta = sidecache.read_meta(db_path, KIND, FORMAT)
    if meta is None:
        yield None
        return
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        if sidecache.usable(meta, conn):
            cache = Cache.open(db_path, meta)
            dirty = changes.changed_since(conn, int(meta["seq"]), DIRTY_MAX)
            if cache is not None and dirty is not None:
                try:
                    files, exact = Evaluator(conn, cache, tag_sql).candidates(node)
                    found = Candidates(cache, files, exact, dirty)
                except _Unsupported:
                    pass
        yield found
    finally:
        if own:
            conn.execute("COMMIT")


def count(
    conn: sqlite3.Connection,
    db_path: str,
    node: Node,
    *,
    tag_sql: TagSql,
    count_sql: CountSql,
    recheck: Sequence[int] = (),
) -> int | None:
    """The number of matching present paths, or None when SQLite must count.

    The search engine hands in its SQL for a tag term's ids (`tag_sql`) and for counting
    the query over a JSON list of file ids (`count_sql`), so this module stays below it;
    `recheck` names files `count_sql` must count whatever the bitmaps say (human verdicts)."""
    with candidates(conn, db_path, node, tag_sql) as found:
        if found is None:
            return None
        cache = found.cache
        dirty = BitMap(found.dirty) | BitMap(recheck)
        if found.exact:
            clean = BitMap(found.found) - dirty if dirty else found.found
            total = cache.paths_in(clean)
            checked = dirty
        else:
            checked = (BitMap(found.found) & cache.present) | dirty
            if len(checked) > CANDIDATES_MAX:
                return None
            total = 0
        if checked:
            sql, params = count_sql(json.dumps(list(checked)))
            total += int(conn.execute(sql, params).fetchone()[0])
        return total
