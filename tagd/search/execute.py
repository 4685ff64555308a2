"""Run a parsed query against the index: hits (through the planner where a ranked page can
skip most matches), counts (from the bitmaps where they can answer), and the scores of the
tags each hit matched."""

from __future__ import annotations

import itertools
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from tagd.index import reviews as review
from tagd.names import from_db
from tagd.search.compile import (
    _Ctx,
    _model_clause,
    _score_condition,
    _similar_terms,
    _tag_ids,
    accepted_counts,
    build_sql,
    scope_model,
)
from tagd.search.plan import (
    _cached_top_k,
    _db_file,
    _driver,
    _driver_walk,
    _top_k,
    shas_of,
    zero_driver,
)
from tagd.search.query import And, Node, Or, Score, Similar, Tag
from tagd.search.types import Hit, Resolved, SearchError, SearchOptions

if TYPE_CHECKING:
    from tagd.search import stream

SHA_BATCH = 4096


def resolve_similar(
    conn: sqlite3.Connection, node: Node, db_path: str | None
) -> dict[Similar, dict[int, float]]:
    """Look up every `similar:` term in the embedding index (imports numpy only if needed)."""
    terms = _similar_terms(node)
    if not terms:
        return {}
    from tagd.search.similar import SimilarError, nearest_files, resolve_ref

    out = {}
    try:
        for term in terms:
            file_id = resolve_ref(conn, term.ref)
            found = nearest_files(
                conn, db_path, scope_model(node), file_id, min_sim=term.min_sim, limit=None
            )
            out[term] = dict(found)
    except SimilarError as exc:
        raise SearchError(str(exc)) from None
    return out


def check_model(conn: sqlite3.Connection, node: Node) -> None:
    name = scope_model(node)
    if name is None:
        return
    from tagd.index.inventory import require_model_id

    require_model_id(conn, name)


def iter_search(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions | None = None,
    *,
    similar: Mapping[Similar, dict[int, float]] | None = None,
) -> Iterator[Hit]:
    """Hits of `node`; `similar` holds its `similar:` terms, resolved (resolve_similar)."""
    opts = opts or SearchOptions()
    check_model(conn, node)
    resolved = Resolved(
        similar=similar or {},
        model_ids=tuple(r[0] for r in conn.execute("SELECT id FROM models ORDER BY id")),
        reviews=review.in_use(conn),
    )
    wanted = positive_tags(node) if opts.with_tags else []
    ctx = _Ctx(model=scope_model(node), similar=resolved.similar, reviews=resolved.reviews)
    rows: Iterable[tuple] | None = _cached_top_k(conn, node, opts, resolved)
    zeros = zero_driver(conn, node, opts) if rows is None else None
    if zeros is not None:
        rows = _with_zero_ranks(conn, node, opts, resolved, zeros)
    if rows is None:
        driver = _driver(conn, node, opts)
        if driver is not None:
            walk = _driver_walk(conn, node, driver, resolved.reviews)
            rows = _top_k(conn, node, opts, resolved, walk)
        elif opts.limit is not None:
            from tagd.search import page

            rows = page.page(conn, _db_file(conn), node, opts, resolved)
        else:
            rows = _streamed(conn, node, opts, resolved)
        if rows is None:
            q = build_sql(node, opts, resolved=resolved)
            rows = conn.execute(q.sql, q.params)
    for path, file_id, sha, mtime_ns, rank in rows:
        tags = matched_scores(conn, file_id, wanted, ctx) if wanted and file_id else {}
        yield Hit(path, sha, tags, file_id, None if rank is None else float(rank), mtime_ns)


def _with_zero_ranks(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions,
    resolved: Resolved,
    walks: list[tuple[int, Tag | Score]],
) -> list[tuple]:
    """A ranked page of a query whose rank is 0 for most matches (plan.zero_driver): the
    files ranked above 0 from the walk of the filter's stored scores, then the files ranked
    0 in path order (build_sql's tie-break) from a page in path order."""
    from tagd.search import page

    k = (opts.limit or 0) + opts.offset
    first = SearchOptions(sort="score", limit=k)
    walk = _driver_walk(conn, node, walks, resolved.reviews)
    rows = [r for r in _top_k(conn, node, first, resolved, walk) if r[4]]
    if len(rows) < k:
        ranked = {r[1] for r in rows}
        by_path = SearchOptions(sort="path", limit=k)
        tail = page.page(conn, _db_file(conn), node, by_path, resolved)
        if tail is None:
            q = build_sql(node, by_path, resolved=resolved)
            tail = conn.execute(q.sql, q.params).fetchall()
        zero = [(p, f, sha, m, 0.0) for p, f, sha, m, _ in tail if f not in ranked]
        rows += zero[: k - len(rows)]
    return rows[opts.offset : k]


def _streamed(
    conn: sqlite3.Connection, node: Node, opts: SearchOptions, resolved: Resolved
) -> Iterator[tuple] | None:
    """Unlimited output from the bitmaps (tagd/search/stream.py), as build_sql's rows."""
    from tagd.search import stream

    found = stream.rows(conn, _db_file(conn), node, opts, resolved)
    if found is None:
        return None
    return _with_sha(conn, found)


def _with_sha(conn: sqlite3.Connection, found: stream.Found) -> Iterator[tuple]:
    rows = found.rows()
    while chunk := list(itertools.islice(rows, SHA_BATCH)):
        shas = shas_of(conn, [r[1] for r in chunk])
        for raw, fid, mtime, rank in chunk:
            yield from_db(raw), fid, shas.get(fid), mtime, rank


def unlimited_paths(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions,
    *,
    similar: Mapping[Similar, dict[int, float]] | None = None,
) -> list[bytes] | None:
    """The exact bytes of every matching path, in output order, from the bitmaps (no Hit
    per row: at 500k paths building them costs more than the search); None when SQLite
    must answer, through iter_search."""
    from tagd.search import stream

    check_model(conn, node)
    resolved = Resolved(similar=similar or {}, reviews=review.in_use(conn))
    found = stream.rows(conn, _db_file(conn), node, opts, resolved, with_mtime=False)
    return None if found is None else found.paths


def search(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions | None = None,
    *,
    limit: int | None = None,
) -> list[Hit]:
    if opts is None:
        opts = SearchOptions(limit=limit, with_tags=True)
    return list(iter_search(conn, node, opts))


def count(
    conn: sqlite3.Connection,
    node: Node,
    opts: SearchOptions | None = None,
    *,
    similar: Mapping[Similar, dict[int, float]] | None = None,
) -> int:
    opts = opts or SearchOptions()
    check_model(conn, node)
    resolved = Resolved(similar=similar or {}, reviews=review.in_use(conn))
    if os.environ.get("TAGD_BITMAPS", "") != "off":
        from tagd.search import bitmaps

        def count_sql(restrict: str) -> tuple[str, Sequence[object]]:
            q = build_sql(node, opts, count=True, restrict=restrict, resolved=resolved)
            return q.sql, q.params

        # The bitmaps hold model selections; a verdict changes only its own file, so the
        # files with verdicts are counted again by SQLite, like files changed since the build.
        judged = review.judged_files(conn, bitmaps.DIRTY_MAX) if resolved.reviews else []
        if judged is not None:
            fast = bitmaps.count(
                conn, _db_file(conn), node, tag_sql=_tag_ids, count_sql=count_sql, recheck=judged
            )
            if fast is not None:
                return fast
    q = build_sql(node, opts, count=True, resolved=resolved)
    return int(conn.execute(q.sql, q.params).fetchone()[0])


def positive_tags(node: Node) -> list[Tag | Score]:
    """Tag and confidence terms not under a NOT: the ones a hit reports scores for."""
    if isinstance(node, Tag | Score):
        return [node]
    if isinstance(node, And | Or):
        return [t for term in node.terms for t in positive_tags(term)]
    return []


def matched_scores(
    conn: sqlite3.Connection,
    file_id: int,
    terms: list[Tag | Score],
    ctx: _Ctx | None = None,
) -> dict[str, float]:
    """The best stored score of each matched tag, keyed `namespace:name`; with verdicts
    (`ctx.reviews`), 1.0 for a tag a person accepted and nothing for one overridden."""
    ctx = ctx or _Ctx()
    out: dict[str, float] = {}
    for term in terms:
        ids, params, cond, cparams = _score_condition(term, ctx.reviews)
        msql, mparams = _model_clause("s", ctx)
        rows = conn.execute(
            "SELECT t.namespace, t.name, max(s.score) FROM scores s JOIN tags t ON t.id = s.tag_id"
            f" WHERE s.file_id = ? AND s.tag_id IN ({ids}) AND {cond}{msql} GROUP BY t.id",
            [file_id, *params, *cparams, *mparams],
        ).fetchall()
        if ctx.reviews and accepted_counts(term):
            rows += conn.execute(
                "SELECT t.namespace, t.name, 1.0 FROM reviews r JOIN tags t ON t.id = r.tag_id "
                f"WHERE r.file_id = ? AND r.verdict = 1 AND r.tag_id IN ({ids})",
                [file_id, *params],
            ).fetchall()
        for ns, name, score in rows:
            key = f"{ns}:{name}"
            out[key] = max(out.get(key, 0.0), float(score))
    return out
