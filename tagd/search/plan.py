"""How a ranked page is found without ranking every match: which term drives (walked in
score order), the ranking cache's bounds, and the top-k loop that stops once no unseen file
can enter the page."""

from __future__ import annotations

import heapq
import json
import sqlite3
from collections.abc import Iterator, Sequence

from tagd.index import changes, sidecache
from tagd.index import reviews as review
from tagd.search import rankcache
from tagd.search.compile import (
    Compiled,
    _Ctx,
    _model_clause,
    _needs_jobs,
    _range_sql,
    _similar_terms,
    _tag_ids,
    build_sql,
    scope_model,
)
from tagd.search.query import And, Node, Or, Range, Score, Tag
from tagd.search.types import Resolved, SearchOptions

TOPK_FIRST_BATCH = 256
TOPK_MAX_BATCH = 4096
DRIVER_COUNT_CAPS = (20_000, 200_000)
WALK_MAX_TAGS = 1024


def _ranked_page(node: Node, opts: SearchOptions) -> bool:
    """A page of the best ranks, which can be found without ranking every match."""
    if opts.sort != "score" or opts.descending is False or opts.limit is None:
        return False
    return not _needs_jobs(node)


def _driver(
    conn: sqlite3.Connection, node: Node, opts: SearchOptions
) -> list[tuple[int, Tag | Score]] | None:
    """The top-level term to walk in score order for a ranked page: a tag, a confidence
    filter, or an OR of those (walked together); a wildcard is the OR of its tags."""
    if not _ranked_page(node, opts):
        return None
    terms = node.terms if isinstance(node, And) else (node,)
    walkable: list[list[tuple[int, Tag | Score]]] = []
    for term in terms:
        walks = _term_walks(conn, term)
        if walks is not None:
            walkable.append(walks)
    if not walkable:
        return None
    if len(walkable) == 1:
        return walkable[0]
    # The shortest lists are the cheapest to walk; count with growing caps so that common
    # tags cost a few ms and only ties at a cap are counted further.
    sizes = {i: 0 for i in range(len(walkable))}
    for cap in DRIVER_COUNT_CAPS:
        for i in list(sizes):
            sizes[i] = _walks_size(conn, walkable[i], cap)
        smallest = min(sizes.values())
        if smallest < cap:
            break
        sizes = {i: n for i, n in sizes.items() if n >= cap}
    best = min(sizes, key=lambda i: (sizes[i], len(walkable[i]), i))
    return walkable[best]


def _cached_top_k(
    conn: sqlite3.Connection, node: Node, opts: SearchOptions, resolved: Resolved
) -> list[tuple] | None:
    """A ranked page of several tags, at least one of them common, checked in the order of
    rank bounds from the cache next to the database (tagd/rankcache.py); None where the cache
    cannot serve the query.

    With a tag too rare for the cache, that tag's list (read from SQLite) gives the candidates
    and the cache bounds the rest. The cache's list of tags is read before numpy is imported,
    so queries it cannot serve start as fast as without it.
    """
    if not _ranked_page(node, opts) or _similar_terms(node) or _zero_terms(node):
        return None
    db = _db_file(conn)
    meta = sidecache.read_meta(db, rankcache.KIND, rankcache.FORMAT)
    if meta is None:
        return None
    try:
        cached = set(meta["tags"])
    except (KeyError, TypeError):
        return None
    groups, listed = _cache_groups(conn, node, cached)
    if not groups or len(groups) + len(listed) < 2:
        return None
    if resolved.reviews and review.touches(conn, [t for g in (*groups, *listed) for t in g]):
        return None  # the cache bounds model scores only; a verdict can lift a rank to 1
    began = not conn.in_transaction
    if began:
        conn.execute("BEGIN")  # one snapshot: the bounds and the checks see the same scores
    try:
        cache = rankcache.RankCache.open(db, meta=meta)
        if cache is None or not cache.usable(conn):
            return None
        dirty = changes.changed_since(conn, cache.seq, rankcache.DIRTY_MAX)
        if dirty is None:
            return None
        driver = None
        if listed:
            cap = DRIVER_COUNT_CAPS[1]
            sizes = [_walks_size(conn, [(t, None) for t in group], cap) for group in listed]
            # A wildcard of many rare tags can list as many files as a common tag: reading
            # it all would cost more than walking (tag_01* solo: 1.5M entries).
            if min(sizes) >= cap:
                return None
            driver = rankcache.listed_scores(conn, listed[sizes.index(min(sizes))])
        ids, bounds = rankcache.candidates(conn, cache, groups, dirty, driver)
        return _top_k(conn, node, opts, resolved, rankcache.descending(ids, bounds))
    finally:
        if began:
            conn.execute("COMMIT")


def _db_file(conn: sqlite3.Connection) -> str:
    return str(conn.execute("PRAGMA database_list").fetchone()[2])


def _cache_groups(
    conn: sqlite3.Connection, node: Node, cached: set[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Tag ids of the top-level AND terms that can bound a rank (an OR: one id per branch):
    those the cache holds, and those it does not (rarer tags, to read from SQLite).

    Other terms only filter or multiply the rank by at most 1, so they leave bounds valid.
    """
    terms = node.terms if isinstance(node, And) else (node,)
    held: list[list[int]] = []
    rare: list[list[int]] = []
    for term in terms:
        walks = _term_walks(conn, term)
        if walks is None or any(not isinstance(w[1], Tag) for w in walks):
            continue
        ids = [w[0] for w in walks]
        (held if all(t in cached for t in ids) else rare).append(ids)
    return held, rare


def _term_walks(conn: sqlite3.Connection, term: Node) -> list[tuple[int, Tag | Score]] | None:
    """The (tag id, term) lists whose merged walk bounds `term`'s rank factor: its tags, or
    every branch's for an OR; None when one of them cannot be walked."""
    walks: list[tuple[int, Tag | Score]] = []
    for branch in term.terms if isinstance(term, Or) else (term,):
        found = _walkable(conn, branch)
        if found is None:
            return None
        walks += found
    return walks


def _walkable(conn: sqlite3.Connection, term: Node) -> list[tuple[int, Tag | Score]] | None:
    """(tag id, term) for each tag of `term` when it can be walked in score order: a tag or a
    confidence filter with every match stored. A wildcard (or a name in several namespaces)
    is walked as the OR of its tags: its rank factor is their best score, which its first
    appearance in the merged walk bounds. Up to WALK_MAX_TAGS tags, one query each."""
    walked: Tag | Score
    if isinstance(term, Tag):
        tag = walked = term
    elif isinstance(term, Score) and not term.range.contains(0.0):
        tag, walked = term.tag, term
    else:
        return None  # (a range with 0 also matches files without a stored score)
    ids = _walked_ids(conn, tag)
    if not ids:
        return None
    return [(i, walked) for i in ids]


def _walked_ids(conn: sqlite3.Connection, tag: Tag) -> list[int] | None:
    """The ids of the tags `tag` names, None past WALK_MAX_TAGS (each is one walk)."""
    sql, params = _tag_ids(tag)
    ids = [int(r[0]) for r in conn.execute(f"{sql} LIMIT ?", [*params, WALK_MAX_TAGS + 1])]
    return None if len(ids) > WALK_MAX_TAGS else ids


def _zero_terms(node: Node) -> list[Score]:
    """Top-level confidence filters whose range takes 0 (`smile:<0.2`): a file without a
    stored score for the tag matches with rank factor 0, so most matches may rank 0 and no
    walk's bound ever falls below them."""
    terms = node.terms if isinstance(node, And) else (node,)
    return [t for t in terms if isinstance(t, Score) and t.range.contains(0.0)]


def zero_driver(
    conn: sqlite3.Connection, node: Node, opts: SearchOptions
) -> list[tuple[int, Tag | Score]] | None:
    """For a ranked page of a query with a zero-inclusive confidence filter: the walk of
    that filter's stored scores above 0 (the smallest such list), which holds every file
    ranked above 0; the files ranked 0 follow in path order (see execute). None: no such
    term, or a wildcard too wide to walk."""
    if not _ranked_page(node, opts):
        return None
    best: list[tuple[int, Tag | Score]] | None = None
    size = 0
    for term in _zero_terms(node):
        rng = term.range
        positive = Score(term.tag, Range(0.0, rng.hi, False, rng.hi_incl), term.column)
        ids = _walked_ids(conn, term.tag)
        if ids is None:
            continue
        walks: list[tuple[int, Tag | Score]] = [(i, positive) for i in ids]
        n = _walks_size(conn, walks, DRIVER_COUNT_CAPS[1])
        if best is None or n < size:
            best, size = walks, n
    return best


def _walk_size(conn: sqlite3.Connection, tag_id: int, term: Tag | Score | None, cap: int) -> int:
    """How many files a tag (None: selected) or confidence filter lists, counted up to `cap`."""
    params: list[object] = []
    if not isinstance(term, Score):
        cond = "selected = 1"
    else:
        cond, params = _range_sql("score", term.range)
        cond = f"selected IN (0, 1) AND {cond}"
    return conn.execute(
        f"SELECT count(*) FROM (SELECT 1 FROM scores WHERE tag_id = ? AND {cond} LIMIT ?)",
        [tag_id, *params, cap],
    ).fetchone()[0]


def _walks_size(
    conn: sqlite3.Connection, walks: Sequence[tuple[int, Tag | Score | None]], cap: int
) -> int:
    """How many entries the walks list together, counted up to `cap` (a wildcard's hundreds
    of tags cost one cap, not one cap each)."""
    total = 0
    for tag_id, term in walks:
        total += _walk_size(conn, tag_id, term, cap - total)
        if total >= cap:
            break
    return total


def _walk(
    conn: sqlite3.Connection, tag_id: int, selected: int, cond: Compiled, model: Compiled
) -> Iterator[tuple[float, int]]:
    """(score, file_id) of one tag in descending score order, in growing keyset pages."""
    sql = (
        "SELECT s.score, s.file_id FROM scores s WHERE s.tag_id = ? AND s.selected = ?"
        f" AND {cond.sql}{model.sql} AND s.score <= ? AND (s.score < ? OR +s.file_id < ?) "
        "ORDER BY s.score DESC, s.file_id DESC LIMIT ?"
    )
    last_score, last_id, batch = 2.0, 0, TOPK_FIRST_BATCH
    while True:
        rows = conn.execute(
            sql,
            [tag_id, selected, *cond.params, *model.params, last_score, last_score, last_id, batch],
        ).fetchall()
        yield from rows
        if len(rows) < batch:
            return
        last_score, last_id = rows[-1]
        batch = min(batch * 2, 16384)


def _driver_walk(
    conn: sqlite3.Connection,
    node: Node,
    driver: list[tuple[int, Tag | Score]],
    reviews: bool = False,
) -> Iterator[tuple[float, int]]:
    """(bound, file id) in descending bound order from the driver's score lists.

    Every rank factor is at most 1 and the driver's factor is at most its current walk score
    (the best branch, for an OR), so a file's rank is at most that score.
    """
    msql, mparams = _model_clause("s", _Ctx(model=scope_model(node)))
    model = Compiled(msql, mparams)
    walks = []
    for tag_id, term in driver:
        if isinstance(term, Tag):
            walks.append(_walk(conn, tag_id, 1, Compiled("1"), model))
            if reviews:
                walks.append(_accepted_walk(conn, tag_id))
        else:
            cond = Compiled(*_range_sql("s.score", term.range))
            walks.append(_walk(conn, tag_id, 1, cond, model))
            walks.append(_walk(conn, tag_id, 0, cond, model))
            if reviews and term.range.contains(1.0):
                walks.append(_accepted_walk(conn, tag_id))
    return heapq.merge(*walks, key=lambda r: (-r[0], -r[1]))


def _accepted_walk(conn: sqlite3.Connection, tag_id: int) -> Iterator[tuple[float, int]]:
    """Files a human gave the tag: rank bound 1, in the walks' (score, file id) order."""
    yield from conn.execute(
        "SELECT 1.0, file_id FROM reviews WHERE tag_id = ? AND verdict = 1 ORDER BY file_id DESC",
        (tag_id,),
    )


def _top_k(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions,
    resolved: Resolved,
    walk: Iterator[tuple[float, int]],
) -> list[tuple]:
    """The best `limit + offset` rows by rank without ranking every match.

    `walk` yields every candidate file with an upper bound of its rank, best bound first:
    once the k-th best rank checked so far beats the current bound, no unseen file can
    enter the page.
    """
    k = (opts.limit or 0) + opts.offset
    if k == 0:
        return []
    rows: list[tuple] = []
    seen: set[int] = set()
    batch, last_score = TOPK_FIRST_BATCH, 2.0
    pending: list[int] = []
    exhausted = False
    while not exhausted:
        pending.clear()
        for score, fid in walk:
            last_score = score
            if fid not in seen:
                seen.add(fid)
                pending.append(fid)
                if len(pending) >= batch:
                    break
        else:
            exhausted = True
        if pending:
            q = build_sql(node, SearchOptions(), restrict=json.dumps(pending), resolved=resolved)
            rows.extend(conn.execute(q.sql, q.params))
        rows.sort(key=lambda r: (-r[4], r[0]))
        del rows[k:]
        if len(rows) >= k and rows[-1][4] > last_score:
            break
        batch = min(batch * 2, TOPK_MAX_BATCH)
    page = rows[opts.offset : k]
    shas = shas_of(conn, [r[1] for r in page])
    return [(path, fid, shas.get(fid), mtime, rank) for path, fid, _, mtime, rank in page]


def shas_of(conn: sqlite3.Connection, file_ids: list[int]) -> dict[int, str]:
    """sha256 by file id, for the rows of a page (one statement)."""
    return dict(
        conn.execute(
            "SELECT id, sha256 FROM files WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(file_ids),),
        ).fetchall()
    )
