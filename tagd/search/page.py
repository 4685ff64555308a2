"""One page of matches in path, mtime or random order without ordering every match.

A grid page (`--limit 100 --sort mtime`, the web UI's "newest" and "random") through SQL
evaluates the query for every file and sorts the result: seconds at 1M files for a common
tag. Here the bitmaps give the candidate files, and the page is read in its order:

- path and mtime: the paths table is walked through its index (paths.path is unique,
  paths_mtime orders mtime) and each row is kept when its file is a candidate, so a page
  of 100 from a tag on a tenth of the files reads ~1,000 rows. Few candidates (fewer than
  the walk would read) are fetched by id and sorted by SQLite instead.
- random: the seeded hash of tagd/search/shuffle.py over the candidate ids (numpy), the
  smallest `offset + limit` picked by partition instead of a full sort.

Candidates the bitmaps evaluate exactly are taken as they are; the rest (terms the bitmaps
cannot evaluate, files changed since the cache was built, files with human verdicts) are
checked by SQLite per path, in the order they are reached, so only the rows the page needs
are checked. The rows, their order and their tie-breaks are build_sql's (tested against it).
None where the bitmaps cannot serve: SQLite answers as before.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from pyroaring import BitMap

from tagd.index import reviews as review
from tagd.names import AS_TEXT, to_db
from tagd.search import bitmaps
from tagd.search.compile import _DEFAULT_DESC, _needs_jobs, _tag_ids, build_sql
from tagd.search.plan import shas_of
from tagd.search.query import Node
from tagd.search.types import Resolved, SearchOptions

FIRST_BATCH = 512
MAX_BATCH = 16_384
FETCH_MAX = 200_000  # candidates beyond this are never fetched by id: the walk reads fewer

Row = tuple[Any, int, Any]  # path as SQLite returns it, file id, mtime_ns


def page(
    conn: sqlite3.Connection, db_path: str, node: Node, opts: SearchOptions, resolved: Resolved
) -> list[tuple] | None:
    """build_sql's rows (path, file id, sha256, mtime_ns, NULL rank) of the page, or None."""
    if opts.limit is None or opts.sort not in ("path", "mtime", "random"):
        return None
    if os.environ.get("TAGD_BITMAPS", "") == "off" or _needs_jobs(node):
        return None
    with bitmaps.candidates(conn, db_path, node, _tag_ids) as found:
        return None if found is None else _page(conn, node, opts, resolved, found)


def _page(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions,
    resolved: Resolved,
    found: bitmaps.Candidates,
) -> list[tuple] | None:
    cache = found.cache
    recheck = BitMap(found.dirty)
    if resolved.reviews:
        judged = review.judged_files(conn, bitmaps.DIRTY_MAX)
        if judged is None:
            return None
        recheck |= BitMap(judged)
    files = BitMap(found.found) & cache.present
    if found.exact:
        sure, check = files - recheck, recheck
    else:
        sure, check = BitMap(), files | recheck
    need = opts.offset + (opts.limit or 0)
    if need == 0 or not (sure or check):
        return []
    keep = _Keep(conn, node, resolved, sure, check)
    if opts.sort == "random":
        rows = _random(conn, sure | check, need, opts.seed, keep)
    else:
        desc = _DEFAULT_DESC[opts.sort] if opts.descending is None else opts.descending
        n = len(sure) + len(check)
        fetch = n <= FETCH_MAX and 2 * n * n <= need * max(len(cache.present), 1)
        source = _fetched(conn, sure | check, opts.sort, desc) if fetch else None
        if source is None:
            source = _by_path(conn, desc) if opts.sort == "path" else _by_mtime(conn, desc)
        rows = []
        for batch in source:
            rows += keep(batch)
            if len(rows) >= need:
                break
    rows = rows[opts.offset : need]
    shas = shas_of(conn, [r[1] for r in rows])
    return [(path, fid, shas.get(fid), mtime, None) for path, fid, mtime in rows]


class _Keep:
    """The rows of a batch that match: a sure file's every present path; a file to check,
    the paths SQLite's own query (build_sql over those ids) returns."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        node: Node,
        resolved: Resolved,
        sure: BitMap,
        check: BitMap,
    ) -> None:
        self.conn, self.node, self.resolved = conn, node, resolved
        self.sure, self.check = sure, check

    def __call__(self, batch: list[Row]) -> list[Row]:
        asked = sorted({fid for _, fid, _ in batch if fid in self.check})
        passed: set[Any] = set()
        if asked:
            q = build_sql(
                self.node,
                SearchOptions(sort="path"),  # no rank: only which paths match
                restrict=json.dumps(asked),
                resolved=self.resolved,
            )
            passed = {(r[0], r[1]) for r in self.conn.execute(q.sql, q.params)}
        sure = self.sure
        return [r for r in batch if r[1] in sure or (r[0], r[1]) in passed]


_COLUMNS = "SELECT path, file_id, mtime_ns FROM paths WHERE missing = 0 AND file_id IS NOT NULL"


def _order(sort: str, desc: bool) -> str:
    """build_sql's ORDER BY for `sort` (a path tie-break ascending, as there)."""
    if sort == "path":
        return f"path {'DESC' if desc else 'ASC'}"
    return f"mtime_ns {'DESC' if desc else 'ASC'}, path"


def _fetched(conn: sqlite3.Connection, files: BitMap, sort: str, desc: bool) -> Iterator[list[Row]]:
    """The candidates' present paths, fetched by id and sorted by SQLite."""
    rows = conn.execute(
        f"{_COLUMNS} AND file_id IN (SELECT value FROM json_each(?)) ORDER BY {_order(sort, desc)}",
        (json.dumps(list(files)),),
    )
    while batch := rows.fetchmany(MAX_BATCH):
        yield batch


def _batches() -> Iterator[int]:
    size = FIRST_BATCH
    while True:
        yield size
        size = min(size * 2, MAX_BATCH)


def _by_path(conn: sqlite3.Connection, desc: bool) -> Iterator[list[Row]]:
    """Every present path in path order, through the unique index, in growing keyset pages."""
    op, order = ("<", "DESC") if desc else (">", "ASC")
    last: Any = None
    params: list[object]
    for size in _batches():
        if last is None:
            sql, params = f"{_COLUMNS} ORDER BY path {order} LIMIT ?", [size]
        else:
            sql = f"{_COLUMNS} AND path {op} {AS_TEXT} ORDER BY path {order} LIMIT ?"
            params = [to_db(last), size]
        batch = conn.execute(sql, params).fetchall()
        if batch:
            yield batch
        if len(batch) < size:
            return
        last = batch[-1][0]


def _by_mtime(conn: sqlite3.Connection, desc: bool) -> Iterator[list[Row]]:
    """Every present path by (mtime, path) through paths_mtime: SQL NULL sorts first
    ascending and last descending; within one mtime, paths ascending."""
    if not desc:
        yield from _null_mtimes(conn)
    op, order = ("<", "DESC") if desc else (">", "ASC")
    last: tuple[int, Any] | None = None
    for size in _batches():
        if last is None:
            batch = conn.execute(
                f"{_COLUMNS} AND mtime_ns IS NOT NULL ORDER BY mtime_ns {order}, path LIMIT ?",
                (size,),
            ).fetchall()
        else:
            # The rest of the last row's mtime, then the mtimes beyond it.
            batch = conn.execute(
                f"{_COLUMNS} AND mtime_ns = ? AND path > {AS_TEXT} ORDER BY path",
                (last[0], to_db(last[1])),
            ).fetchall()
            batch += conn.execute(
                f"{_COLUMNS} AND mtime_ns {op} ? ORDER BY mtime_ns {order}, path LIMIT ?",
                (last[0], size),
            ).fetchall()
        if batch:
            yield batch
            last = (batch[-1][2], batch[-1][0])
        if last is None or len(batch) < size:
            break
    if desc:
        yield from _null_mtimes(conn)


def _null_mtimes(conn: sqlite3.Connection) -> Iterator[list[Row]]:
    rows = conn.execute(f"{_COLUMNS} AND mtime_ns IS NULL ORDER BY path")
    while batch := rows.fetchmany(MAX_BATCH):
        yield batch


def _random(
    conn: sqlite3.Connection, files: BitMap, need: int, seed: int | None, keep: _Keep
) -> list[Row]:
    """The first `need` rows in the seeded order (hash, file id, path) of build_sql: the
    smallest keys by partition, in growing prefixes, each file's paths read by id."""
    import numpy as np

    from tagd.search.shuffle import key

    if seed is None:
        from tagd.search.shuffle import new_seed

        seed = new_seed()
    ids = np.asarray(files.to_array(), dtype=np.int64)
    order = (key(seed, ids).astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)
    rows: list[Row] = []
    done, size = 0, min(len(ids), max(2 * need, FIRST_BATCH))
    while done < len(ids):
        whole = size >= len(ids)
        part = np.arange(len(ids)) if whole else np.argpartition(order, size - 1)[:size]
        part = part[np.argsort(order[part], kind="stable")][done:size]
        fids = ids[part].tolist()
        by_file: dict[int, list[Row]] = {f: [] for f in fids}
        for row in conn.execute(
            f"{_COLUMNS} AND file_id IN (SELECT value FROM json_each(?)) ORDER BY path",
            (json.dumps(fids),),
        ):
            by_file[row[1]].append(row)
        rows += keep([r for f in fids for r in by_file[f]])
        if len(rows) >= need:
            break
        done, size = size, min(len(ids), size * 4)
    return rows
