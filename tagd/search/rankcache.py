"""Dense score columns of the most common tags, kept next to the database for ranked search.

A ranked page of two or three common tags (`1girl solo long_hair`) is the product of scores
that are mostly close to 1, so walking one tag's list in score order (search._top_k) has to
check tens of thousands of files before no unseen one can beat the page. This cache holds,
for each tag selected on at least `min_files` files, one uint16 column indexed by file id: an
upper bound of the file's best selected score for that tag (0 = not selected). Multiplying a
query's columns bounds every file's rank at once, so search checks files in bound order and
stops after little more than a page.

On disk, with the discipline of every cache beside the database (tagd/index/sidecache.py: db
id and seq check, atomic data file then meta, the folder's file mode, a logged reason when it
cannot be written): `<db>.rank.json` (tags, capacity, the `score_changes` seq the columns
reflect, the column file's name) and `<db>.rank-<stamp>.npy` ([tags, capacity] uint16,
memory-mapped). numpy is imported when a cache is used, not with this module, so a query the
cache cannot serve starts without it.
Files whose `score_changes` seq is newer than the cache's are dirty: search bounds them from
SQLite instead. `refresh` (the daemon's schedule, the end of `tagd scan`) patches dirty
columns in place, and rebuilds when tags may have become common or ids outgrew the capacity.

A query racing a patch may bound a file re-tagged in that instant by its new scores while
checking it against the old ones; every other file is ranked exactly as of its snapshot.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tagd.index import changes, sidecache

if TYPE_CHECKING:
    import numpy as np

KIND = "rank"

SCALE = 65535
MIN_FILES = 20_000
MAX_BYTES = 1 << 30
REBUILD_AFTER_S = 24 * 3600
DIRTY_MAX = 20_000
FORMAT = 1


def quantize_up(scores: np.ndarray) -> np.ndarray:
    """uint16 q with q / SCALE >= score: rounding up keeps every product an upper bound."""
    import numpy as np

    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    q = np.floor(s * SCALE) + 1
    q[s <= 0.0] = 0
    return np.minimum(q, SCALE).astype(np.uint16)


def bound(columns: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Rank bounds: per AND term the best of its OR branches' columns, multiplied."""
    import numpy as np

    out: np.ndarray | None = None
    for branches in columns:
        best = branches[0] if len(branches) == 1 else np.maximum.reduce(list(branches))
        term = best.astype(np.float64) / SCALE
        out = term if out is None else out * term
    assert out is not None
    return out


def meta_path(db_path: str | Path) -> Path:
    return sidecache.meta_path(db_path, KIND)


@dataclass
class RankCache:
    db_id: str
    seq: int
    capacity: int
    rows: dict[int, int]
    columns: np.ndarray
    built_at: float
    file: str

    @classmethod
    def open(
        cls, db_path: str | Path, *, writable: bool = False, meta: dict | None = None
    ) -> RankCache | None:
        """The cache next to `db_path`, or None when absent, unreadable or of another format.

        `meta`: its `.rank.json`, when the caller has already read it.
        """
        import numpy as np

        if meta is None:
            meta = sidecache.read_meta(db_path, KIND, FORMAT)
        if meta is None or meta.get("format") != FORMAT:
            return None
        try:
            rows = {int(t): i for i, t in enumerate(meta["tags"])}
            capacity = int(meta["capacity"])
            if rows:
                path = Path(db_path).parent / meta["file"]
                columns = np.load(path, mmap_mode="r+" if writable else "r")
            else:
                columns = np.zeros((0, capacity), dtype=np.uint16)
            if columns.shape != (len(rows), capacity) or columns.dtype != np.uint16:
                return None
            return cls(
                str(meta["db_id"]),
                int(meta["seq"]),
                capacity,
                rows,
                columns,
                float(meta["built_at"]),
                str(meta["file"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def usable(self, conn: sqlite3.Connection) -> bool:
        """Built from this database, not from a later state of it (a restored backup)."""
        return sidecache.usable({"db_id": self.db_id, "seq": self.seq}, conn)

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "db_id": self.db_id,
            "seq": self.seq,
            "capacity": self.capacity,
            "tags": sorted(self.rows, key=self.rows.__getitem__),
            "built_at": self.built_at,
            "file": self.file,
        }

    def column(self, tag_id: int) -> np.ndarray | None:
        row = self.rows.get(tag_id)
        return None if row is None else self.columns[row]


def best_scores(
    conn: sqlite3.Connection, file_ids: Sequence[int], tag_ids: Sequence[int]
) -> dict[tuple[int, int], float]:
    """(file, tag) -> best selected score over every model, read from SQLite."""
    if not file_ids or not tag_ids:
        return {}
    models = [int(r[0]) for r in conn.execute("SELECT id FROM models")]
    # Every key column bound, so each (file, model, tag) is one primary-key seek.
    return {
        (int(f), int(t)): float(s)
        for f, t, s in conn.execute(
            "SELECT s.file_id, s.tag_id, max(s.score) FROM json_each(?) d "
            "CROSS JOIN json_each(?) g CROSS JOIN scores s ON s.file_id = d.value "
            f"AND s.model_id IN ({', '.join('?' * len(models))}) AND s.tag_id = g.value "
            "WHERE s.selected = 1 GROUP BY s.file_id, s.tag_id",
            (json.dumps(list(file_ids)), json.dumps(list(tag_ids)), *models),
        )
    }


def common_tags(
    conn: sqlite3.Connection, min_files: int, capacity: int, max_bytes: int
) -> list[int]:
    """Tags selected on at least `min_files` files, most common first, within the budget."""
    rows = conn.execute(
        "SELECT tag_id, count(*) AS n FROM scores WHERE selected = 1 "
        "GROUP BY tag_id HAVING n >= ? ORDER BY n DESC, tag_id",
        (min_files,),
    ).fetchall()
    fit = max(0, max_bytes // max(1, 2 * capacity))
    return [int(r[0]) for r in rows[:fit]]


def build(
    conn: sqlite3.Connection,
    db_path: str | Path,
    *,
    min_files: int = MIN_FILES,
    max_bytes: int = MAX_BYTES,
) -> RankCache:
    """Write a fresh cache from one read snapshot (callers hold the lock)."""
    import numpy as np

    conn.execute("BEGIN")
    try:
        seq = changes.current_seq(conn)
        ident = changes.db_id(conn)
        top = int(conn.execute("SELECT coalesce(max(id), 0) FROM files").fetchone()[0])
        capacity = top + top // 4 + 4096
        tags = common_tags(conn, min_files, capacity, max_bytes)
        columns = np.zeros((len(tags), capacity), dtype=np.uint16)
        for row, tag in enumerate(tags):
            cur = conn.execute(
                "SELECT file_id, score FROM scores WHERE tag_id = ? AND selected = 1", (tag,)
            )
            while chunk := cur.fetchmany(65536):
                arr = np.asarray(chunk, dtype=np.float64)
                ids = arr[:, 0].astype(np.int64)
                np.maximum.at(columns[row], ids, quantize_up(arr[:, 1]))
    finally:
        conn.execute("COMMIT")
    # No common tag, no column file: the meta alone says so.
    name = (
        sidecache.write_data(db_path, KIND, "npy", lambda fh: np.save(fh, columns)) if tags else ""
    )
    rows = {t: i for i, t in enumerate(tags)}
    cache = RankCache(ident, seq, capacity, rows, columns, time.time(), name)
    old = sidecache.read_meta(db_path, KIND, FORMAT)
    sidecache.replace(db_path, KIND, cache.meta(), None if old is None else old.get("file"))
    return cache


def patch(conn: sqlite3.Connection, db_path: str | Path, cache: RankCache) -> int | None:
    """Bring stale columns up to date in place; None when only a rebuild can (too many
    changes, or file ids past the capacity). Readers stay exact meanwhile: a file patched
    under them is newer than the seq they read, so they bound it from SQLite anyway."""
    import numpy as np

    conn.execute("BEGIN")
    try:
        seq = changes.current_seq(conn)
        dirty = changes.changed_since(conn, cache.seq, max(DIRTY_MAX, cache.capacity // 4))
        if dirty is None or any(f >= cache.capacity for f in dirty):
            return None
        rows = conn.execute(
            "SELECT file_id, tag_id, max(score) FROM scores "
            "WHERE file_id IN (SELECT value FROM json_each(?)) AND selected = 1 "
            "GROUP BY file_id, tag_id",
            (json.dumps(dirty),),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    if dirty and cache.rows:
        cache.columns[:, np.asarray(dirty, dtype=np.int64)] = 0
        found = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
        row_of = np.array([cache.rows.get(int(t), -1) for t in found[:, 1]], dtype=np.int64)
        held = row_of >= 0
        cache.columns[row_of[held], found[held, 0].astype(np.int64)] = quantize_up(found[held, 2])
        cache.columns.flush()  # type: ignore[attr-defined]  # a np.memmap at run time
    cache.seq = seq
    sidecache.write_meta(db_path, KIND, cache.meta())
    return len(dirty)


def refresh(
    conn: sqlite3.Connection,
    db_path: str | Path,
    *,
    min_files: int = MIN_FILES,
    max_bytes: int = MAX_BYTES,
    max_age_s: float = REBUILD_AFTER_S,
) -> str:
    """Patch or rebuild the cache as needed: 'fresh', 'patched N', 'built' or 'skipped'."""
    with sidecache.locked(db_path, KIND) as ok:
        if not ok:
            return "skipped"
        try:
            cache = RankCache.open(db_path, writable=True)
            if (
                cache is not None
                and cache.usable(conn)
                and time.time() - cache.built_at < max_age_s
            ):
                if cache.seq == changes.current_seq(conn):
                    return "fresh"
                n = patch(conn, db_path, cache)
                if n is not None:
                    return f"patched {n}"
            build(conn, db_path, min_files=min_files, max_bytes=max_bytes)
            return "built"
        except OSError as exc:
            sidecache.not_written(KIND, db_path, exc)
            return "skipped"


def candidates(
    conn: sqlite3.Connection,
    cache: RankCache,
    groups: Sequence[Sequence[int]],
    dirty: Sequence[int],
    listed: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(file ids, rank bounds) of every file that may match all `groups`.

    Without `listed`, candidates are every file the cached columns bound above 0. With it
    (a rarer tag's (file ids, best scores), read from SQLite in the same snapshot), only those
    files are candidates, and its score is one more factor. Files changed since the cache's
    seq (or past its capacity) are bounded from SQLite instead of the columns.
    """
    import numpy as np

    stale = np.asarray(sorted(dirty), dtype=np.int64)
    if listed is None:
        bounds = bound([[cache.columns[cache.rows[t]] for t in group] for group in groups])
        bounds[stale[stale < cache.capacity]] = 0.0
        ids = np.flatnonzero(bounds)
        vals = bounds[ids]
        recheck = stale
        base: dict[int, float] = {}
    else:
        all_ids, scores = listed
        clean = (all_ids < cache.capacity) & ~np.isin(all_ids, stale)
        ids, vals = all_ids[clean], scores[clean].astype(np.float64)
        for group in groups:
            vals = vals * (np.max(cache.columns[[cache.rows[t] for t in group]][:, ids], 0) / SCALE)
        keep = vals > 0
        ids, vals = ids[keep], vals[keep]
        recheck = all_ids[~clean]
        base = dict(zip(recheck.tolist(), scores[~clean].tolist(), strict=True))
    if len(recheck):
        tags = sorted({t for group in groups for t in group})
        best = best_scores(conn, recheck.tolist(), tags)
        extra = []
        for f in recheck.tolist():
            b = base.get(f, 1.0)
            for g in groups:
                b *= max(best.get((f, t), 0.0) for t in g)
            if b > 0:
                extra.append((f, b))
        if extra:
            ids = np.concatenate([ids, np.asarray([e[0] for e in extra], dtype=np.int64)])
            vals = np.concatenate([vals, np.asarray([e[1] for e in extra], dtype=np.float64)])
    return ids, vals


def listed_scores(
    conn: sqlite3.Connection, tag_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(file ids, best selected score over every model and `tag_ids`) from SQLite."""
    import numpy as np

    rows = conn.execute(
        "SELECT file_id, max(score) FROM scores WHERE tag_id IN "
        "(SELECT value FROM json_each(?)) AND selected = 1 GROUP BY file_id",
        (json.dumps(list(tag_ids)),),
    ).fetchall()
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0].astype(np.int64), arr[:, 1]


def descending(
    ids: np.ndarray, bounds: np.ndarray, first: int = 4096
) -> Iterator[tuple[float, int]]:
    """(bound, file id), best first: a partial sort for the head, which is usually all that
    is read, then the rest. Bounds are widened by a hair so float rounding never lets a rank
    computed by SQLite exceed its bound."""
    import numpy as np

    bounds = bounds * (1 + 1e-9)
    if len(ids) > first:
        head = np.argpartition(-bounds, first - 1)[:first]
        order = head[np.argsort(-bounds[head], kind="stable")]
        yield from zip(bounds[order].tolist(), ids[order].tolist(), strict=True)
        rest = np.ones(len(ids), dtype=bool)
        rest[head] = False
        ids, bounds = ids[rest], bounds[rest]
    order = np.argsort(-bounds, kind="stable")
    yield from zip(bounds[order].tolist(), ids[order].tolist(), strict=True)
