"""Unlimited output from the posting-list bitmaps: every match, in SQLite's order.

Unlimited output through SQLite ranks and sorts every match with per-row subqueries (seconds
for half a million paths at 1M files). Where the bitmaps evaluate the whole query exactly,
the matching file ids come from them; one read of those files' present paths, and for
`--sort score` one read of each query tag's selected scores, give every row. The order is
the one build_sql's ORDER BY gives, reproduced exactly:

- score: rank (computed with SQLite's own float operations, in the same order: the product
  of the AND terms' ranks, left to right; the best branch of an OR) then path;
- mtime: mtime then path; path: path (bytes compared as SQLite's BINARY collation does);
- random: the seeded order of search/shuffle.py, as the SQL gives it.

Files changed since the bitmaps' seq are checked by SQLite (build_sql over those ids), so a
stale cache costs time, never correctness. None (SQLite answers) for everything else: a
`--limit`, human verdicts in the index, terms the bitmaps cannot evaluate exactly
(confidence, file attributes, paths, `model:`, `untagged`, `failed`, `similar:`), no usable
cache, or more changed files than the bitmaps take.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyroaring import BitMap

from tagd.search import bitmaps
from tagd.search.compile import _DEFAULT_DESC, _tag_ids, build_sql
from tagd.search.query import And, Node, Or, Tag
from tagd.search.types import Resolved, SearchOptions

if TYPE_CHECKING:
    import numpy as np

# Paths are sorted as a fixed-width numpy array (its width: the longest path) up to this size,
# else by Python (slower, no copy): one long name must not cost a gigabyte at 1M paths.
NUMPY_SORT_MAX_BYTES = 64 << 20
READ_THREADS = 2  # tag reads beside the paths' read


@dataclass
class Found:
    """The matching present paths as columns, in output order once `ordered`."""

    paths: list[bytes]
    file_ids: np.ndarray  # int64
    mtimes: np.ndarray  # int64; 0 where `no_mtime`
    no_mtime: np.ndarray  # bool: SQL NULL
    ranks: np.ndarray | None  # float64; None: no rank (NULL in SQL)

    def __len__(self) -> int:
        return len(self.paths)

    def rows(self) -> Iterator[tuple[bytes, int, int | None, float | None]]:
        """(path bytes, file id, mtime_ns, rank), as build_sql gives them."""
        ranks = [None] * len(self) if self.ranks is None else self.ranks.tolist()
        mtimes = [
            None if null else m
            for m, null in zip(self.mtimes.tolist(), self.no_mtime.tolist(), strict=True)
        ]
        return zip(self.paths, self.file_ids.tolist(), mtimes, ranks, strict=True)


def rows(
    conn: sqlite3.Connection,
    db_path: str,
    node: Node,
    opts: SearchOptions,
    resolved: Resolved,
    *,
    with_mtime: bool = True,
) -> Found | None:
    """Every matching present path in output order, or None when SQLite must answer.

    `with_mtime=False` (output of paths alone) reads mtimes only to order by them; the rows
    then carry NULL mtimes (a quarter less to read at 500k paths)."""
    if opts.limit is not None or resolved.reviews or resolved.similar:
        return None
    if os.environ.get("TAGD_BITMAPS", "") == "off":
        return None
    collect = gc.isenabled()
    gc.disable()  # half a million rows of tuples: collections would find nothing to free
    try:
        with bitmaps.candidates(conn, db_path, node, _tag_ids) as found:
            if found is None or not found.exact:
                return None
            with_mtime = with_mtime or opts.sort == "mtime"
            listed = _rows(conn, found, node, opts, resolved, with_mtime)
            return _ordered(listed, opts)
    finally:
        if collect:
            gc.enable()


def _rows(
    conn: sqlite3.Connection,
    found: bitmaps.Candidates,
    node: Node,
    opts: SearchOptions,
    resolved: Resolved,
    with_mtime: bool,
) -> Found:
    import numpy as np

    dirty = found.dirty
    clean = BitMap(found.found)
    clean &= found.cache.present
    clean.difference_update(BitMap(dirty))
    cur = conn.cursor()
    cur.row_factory = None
    reads = None
    if opts.sort == "score":
        top = max(clean.max() if clean else 0, max(dirty, default=0)) + 1
        reads = TagReads(cur, top)
        reads.start(_tags_of(node))
    mtime_sql = ", coalesce(mtime_ns, 0), mtime_ns IS NULL" if with_mtime else ""
    listed = cur.execute(
        f"SELECT CAST(path AS BLOB), file_id{mtime_sql} FROM paths WHERE missing = 0 "
        "AND file_id IN (SELECT value FROM json_each(?))",
        (json.dumps(list(clean)),),
    ).fetchall()
    ranks: list[float | None] = []
    if dirty:
        q = build_sql(node, opts, restrict=json.dumps(dirty), resolved=resolved)
        for path, fid, _, mtime, rank in cur.execute(q.sql, q.params):
            raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else path
            listed.append((raw, fid, mtime or 0, mtime is None) if with_mtime else (raw, fid))
            ranks.append(None if rank is None else float(rank))
    n_clean = len(listed) - len(ranks)
    columns = list(zip(*listed, strict=True)) or [(), (), (), ()]
    del listed
    paths = list(columns[0])
    fids = np.array(columns[1], dtype=np.int64)
    if with_mtime:
        mtimes = np.array(columns[2], dtype=np.int64)
        no_mtime = np.array(columns[3], dtype=bool)
    else:
        mtimes, no_mtime = np.zeros(len(paths), dtype=np.int64), np.ones(len(paths), dtype=bool)
    del columns
    rank = None
    if reads is not None:
        dense = _ranks(reads, node)
        if dense is not None:
            rank = np.empty(len(paths), dtype=np.float64)
            rank[:n_clean] = dense[fids[:n_clean]]
            rank[n_clean:] = np.asarray(ranks, dtype=np.float64)
    return Found(paths, fids, mtimes, no_mtime, rank)


class TagReads:
    """Each query tag's best selected score per file id below `top`, read ahead.

    SQLite spends most of a tag's read formatting rows for Python; here it hands back three
    comma-separated integer lists per tag id instead (file ids, and each score split exactly
    into hi = trunc(score * 2^53) and lo = the rest * 2^53, which reassemble the same
    double; SQLite itself counts any score the split cannot hold, and such a tag is read row
    by row). The reads run on their own read-only connections in two threads while this
    connection reads the paths (sqlite3 releases the GIL while SQLite works); one whose
    snapshot is not this connection's (the change-log seq moved in between) is read again
    here."""

    def __init__(self, cur: sqlite3.Cursor, top: int) -> None:
        from tagd.index import changes
        from tagd.index.db import database_file

        self.cur, self.top = cur, top
        self.db_path = database_file(cur.connection)
        self.seq = changes.current_seq(cur.connection)
        self.pending: dict[int, Future[np.ndarray | None]] = {}

    def start(self, tags: list[Tag]) -> None:
        if not tags or self.db_path is None:
            return
        pool = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(tags)))
        for tag in tags:
            self.pending[id(tag)] = pool.submit(self._read_apart, tag)
        pool.shutdown(wait=False)

    def best(self, tag: Tag) -> np.ndarray:
        ahead = self.pending.pop(id(tag), None)
        found = ahead.result() if ahead is not None else None
        return found if found is not None else _best_scores(self.cur, tag, self.top)

    def _read_apart(self, tag: Tag) -> np.ndarray | None:
        from tagd.index import changes
        from tagd.index.db import connect_bare_readonly

        assert self.db_path is not None

        conn = connect_bare_readonly(self.db_path)
        try:
            conn.execute("BEGIN")
            if changes.current_seq(conn) != self.seq:
                return None
            return _best_scores(conn.cursor(), tag, self.top)
        except sqlite3.Error:
            return None
        finally:
            conn.close()


_TWO53 = "9007199254740992.0"
_SPLIT_SQL = (
    f"SELECT group_concat(file_id), group_concat(hi), group_concat(CAST(lo * {_TWO53} AS INTEGER)),"
    f" total(lo * {_TWO53} != CAST(lo * {_TWO53} AS INTEGER)) FROM ("
    f"SELECT file_id, CAST(score * {_TWO53} AS INTEGER) AS hi,"
    f" score * {_TWO53} - CAST(score * {_TWO53} AS INTEGER) AS lo"
    " FROM scores WHERE tag_id = ? AND selected = 1)"
)


def _best_scores(cur: sqlite3.Cursor, tag: Tag, top: int) -> np.ndarray:
    """A tag's factor: its best selected score over every model per file id (0 without)."""
    import numpy as np

    sql, params = _tag_ids(tag)
    best = np.zeros(top, dtype=np.float64)
    for (tag_id,) in cur.execute(sql, params).fetchall():
        ids, hi, lo, inexact = cur.execute(_SPLIT_SQL, (tag_id,)).fetchone()
        if ids is None:
            continue
        if inexact:  # a score below 2^-53 keeps bits the split drops: read it as it is
            rows = cur.execute(
                "SELECT file_id, score FROM scores WHERE tag_id = ? AND selected = 1", (tag_id,)
            ).fetchall()
            fids = np.array([r[0] for r in rows], dtype=np.int64)
            scores = np.array([r[1] for r in rows], dtype=np.float64)
        else:
            fids = np.fromstring(ids, dtype=np.int64, sep=",")
            scores = np.fromstring(hi, dtype=np.int64, sep=",").astype(np.float64) * 2.0**-53
            scores += np.fromstring(lo, dtype=np.int64, sep=",").astype(np.float64) * 2.0**-106
        keep = fids < top
        np.maximum.at(best, fids[keep], scores[keep])
    return best


def _tags_of(node: Node) -> list[Tag]:
    """The tags `_factors` reads, in the order it reads them."""
    if isinstance(node, Tag):
        return [node]
    if isinstance(node, And | Or):
        return [t for term in node.terms for t in _tags_of(term)]
    return []


def _ranks(reads: TagReads, node: Node) -> np.ndarray | None:
    """The rank build_sql computes (compile._rank) of every file id below `top`; None: the
    query has no rank.

    Only trees the bitmaps evaluate get here: tags, ratings, NOT, AND, OR. Ratings and NOTs
    add no factor; a tag's factor is its best selected score over every model (0 without
    one); an OR's is its best branch (1 for a branch without a factor); an AND multiplies
    its factors left to right, as SQLite evaluates `a * b * c`, so every product rounds as
    SQLite's does."""
    factors = _factors(reads, node)
    if factors is None:
        return None
    out = factors[0]
    for factor in factors[1:]:
        out = out * factor
    return out


def _factors(reads: TagReads, node: Node) -> list[np.ndarray] | None:
    """What SQLite multiplies, in order: build_sql writes a nested AND's product into its
    parent's without parentheses, so `a (b c)` is `a * b * c`, not `a * (b * c)`."""
    import numpy as np

    if isinstance(node, Tag):
        return [reads.best(node)]
    if isinstance(node, And):
        parts = [_factors(reads, t) for t in node.terms]
        real = [f for part in parts if part is not None for f in part]
        return real or None
    if isinstance(node, Or):
        if len(node.terms) == 1:
            return _factors(reads, node.terms[0])
        branches = [_ranks(reads, t) for t in node.terms]
        if all(b is None for b in branches):
            return None
        ones = np.ones(reads.top, dtype=np.float64)
        return [np.maximum.reduce([ones if b is None else b for b in branches])]
    return None


def _path_order(paths: list[bytes]) -> np.ndarray:
    """Positions of `paths` in SQLite's BINARY order (bytes compared unsigned, as numpy's
    fixed-width bytes and Python's bytes both compare them; paths hold no NUL)."""
    import numpy as np

    longest = max(map(len, paths), default=1)
    if longest * len(paths) <= NUMPY_SORT_MAX_BYTES:
        return np.argsort(np.array(paths, dtype=f"S{max(longest, 1)}"), kind="stable")
    return np.asarray(sorted(range(len(paths)), key=paths.__getitem__), dtype=np.int64)


def _ordered(found: Found, opts: SearchOptions) -> Found:
    """build_sql's ORDER BY: the main key (SQL NULL below every value), then path."""
    import numpy as np

    if opts.sort == "random":
        from tagd.search.shuffle import key, new_seed

        by_path = _path_order(found.paths)
        fids = found.file_ids[by_path]
        ranks = key(new_seed() if opts.seed is None else opts.seed, fids)
        order = by_path[np.lexsort([np.arange(len(by_path)), fids, ranks])]
    else:
        desc = _DEFAULT_DESC[opts.sort] if opts.descending is None else opts.descending
        by_path = _path_order(found.paths)
        if opts.sort == "path":
            order = by_path[::-1] if desc else by_path
        else:
            if opts.sort == "score" and found.ranks is None:
                keys: list[np.ndarray] = []  # every rank NULL: path order alone
            elif opts.sort == "score":
                assert found.ranks is not None
                ranks = found.ranks[by_path]
                keys = [-ranks if desc else ranks]
            else:
                mtimes, null = found.mtimes[by_path], found.no_mtime[by_path]
                # ~m reverses int64 order without overflow; NULL first ascending, last descending
                keys = [~mtimes, null] if desc else [mtimes, ~null]
            # lexsort: the last key is the primary one; positions break ties in path order
            keys = [np.arange(len(by_path)), *keys]
            order = by_path[np.lexsort(keys)] if len(keys) > 1 else by_path
    order = order[opts.offset :]
    paths = np.empty(len(found.paths), dtype=object)
    paths[:] = found.paths
    return Found(
        paths[order].tolist(),
        found.file_ids[order],
        found.mtimes[order],
        found.no_mtime[order],
        None if found.ranks is None else found.ranks[order],
    )
