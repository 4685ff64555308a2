"""Run a parsed query against the index. User text only ever reaches SQL as parameters.

A tag term matches a file when any model selected that tag for it (each model's own
thresholds were applied when the scores were stored or reindexed); `model:NAME` narrows
every term to that model. Confidence filters read the stored score itself: a file the model
processed without a stored score for the tag (it was below the floor, default 0.05) counts
as score 0. Results rank by the product of the matched tags' confidences (best branch of
an OR; similarity for `similar:`).
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tagd.index import reviews as review
from tagd.names import AS_TEXT, bind, to_db
from tagd.search.query import (
    And,
    FileFilter,
    Flag,
    Model,
    Node,
    Not,
    Or,
    QueryError,
    Range,
    Rating,
    Score,
    Similar,
    Tag,
    TimeBound,
    TimeRange,
    walk,
)

SORTS = ("score", "mtime", "path", "random")
TOPK_FIRST_BATCH = 256
TOPK_MAX_BATCH = 4096
MAX_FUNCTION_ARGS = 100  # SQLite's default SQLITE_MAX_FUNCTION_ARG is 127
DRIVER_COUNT_CAPS = (20_000, 200_000)
_DEFAULT_DESC = {"score": True, "mtime": True, "path": False, "random": False}


@dataclass
class Compiled:
    sql: str
    params: list[object] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    path: str
    sha256: str | None
    tags: dict[str, float]
    file_id: int | None = None
    rank: float | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class SearchOptions:
    """What the user asked for: order and page. What the index answers about the query is
    in `Resolved`, so one request can run against any index without being rewritten."""

    sort: str = "score"
    descending: bool | None = None
    limit: int | None = None
    offset: int = 0
    with_tags: bool = False


@dataclass(frozen=True)
class Resolved:
    """What one query needs from the index, looked up once per query and passed down."""

    # Files found by each `similar:` term, with their similarity (see resolve_similar).
    similar: Mapping[Similar, dict[int, float]] = field(default_factory=dict)
    # Every model id, bound as literals so per-file probes seek the whole primary key.
    model_ids: tuple[int, ...] | None = None
    # Human verdicts exist (tagd/review.py): tag terms follow them.
    reviews: bool = False


class SearchError(Exception):
    """A well-formed query that cannot run against this index (unknown model, ...)."""


@dataclass(frozen=True, kw_only=True)
class _Ctx:
    """How one query compiles: the `*_sql` fields are SQL text spliced into the statement
    (column expressions, a table alias), the rest are values bound or consulted."""

    # The file id column, or "?" where the file id is bound per probe.
    file_sql: str = "?"
    # A path row's path and mtime columns; None tests any of the file's live paths.
    path_sql: str | None = None
    mtime_sql: str | None = None
    # The alias of a joined `files` row; None reads it by id.
    files_sql: str | None = None
    model: str | None = None
    similar: Mapping[Similar, dict[int, float]] = field(default_factory=dict)
    now: float = 0
    untagged: bool = False
    correlated: bool = False
    model_ids: tuple[int, ...] | None = None
    reviews: bool = False


def scope_model(node: Node) -> str | None:
    """The model named by a top-level `model:` term, if any.

    `model:NAME` also keeps only files that model processed, except next to `untagged`,
    where it only names the model whose output is missing.
    """
    terms = node.terms if isinstance(node, And) else (node,)
    return next((t.name for t in terms if isinstance(t, Model)), None)


def compile_where(
    node: Node,
    *,
    file_col: str = "f.id",
    path_col: str | None = None,
    files_alias: str | None = "f",
    mtime_col: str | None = None,
    similar: dict[Similar, dict[int, float]] | None = None,
    now: float | None = None,
    correlated: bool = False,
    reviews: bool = False,
) -> Compiled:
    """A boolean SQL expression over the alias `f` (files) by default.

    `path_col`/`mtime_col` make path filters test that path row instead of any of the file's
    paths; `similar` holds the resolved `similar:` terms.
    """
    ctx = _Ctx(
        file_sql=file_col,
        path_sql=path_col,
        files_sql=files_alias,
        mtime_sql=mtime_col,
        model=scope_model(node),
        similar=similar or {},
        now=time.time() if now is None else now,
        untagged=_has_flag(node, "untagged"),
        correlated=correlated,
        reviews=reviews,
    )
    return _where(node, ctx)


def _model_clause(alias: str, ctx: _Ctx, probe: bool = False) -> tuple[str, list[object]]:
    """Scope to the `model:` model; `probe` names every model otherwise, so a per-file lookup
    seeks the (file_id, model_id, tag_id) key instead of scanning the file's rows."""
    if ctx.model is None:
        if not probe:
            return "", []
        if ctx.model_ids is None:
            return f" AND {alias}.model_id IN (SELECT id FROM models)", []
        marks = ", ".join("?" * len(ctx.model_ids))
        return f" AND {alias}.model_id IN ({marks})", list(ctx.model_ids)
    return f" AND {alias}.model_id = (SELECT id FROM models WHERE name = ?)", [ctx.model]


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "[?" else c for c in text)


def _tag_ids(term: Tag) -> tuple[str, list[object]]:
    """SQL for the ids of the tags `term` names (a set, for wildcards and bare names)."""
    conds: list[str] = []
    params: list[object] = []
    if term.wildcard:
        if term.name.strip("*"):
            conds.append("name GLOB ?")
            params.append(_glob_escape(term.name))
    else:
        conds.append("name = ?")
        params.append(term.name)
    if term.namespace is not None:
        conds.append("namespace = ?")
        params.append(term.namespace)
    where = " AND ".join(conds) or "1"
    return f"SELECT id FROM tags WHERE {where}", params


def _range_sql(
    expr: str, rng: Range | TimeRange, conv: Callable[[Any], Any] = lambda v: v
) -> tuple[str, list[object]]:
    parts: list[str] = []
    params: list[object] = []
    if rng.lo is not None:
        parts.append(f"{expr} {'>=' if rng.lo_incl else '>'} ?")
        params.append(conv(rng.lo))
    if rng.hi is not None:
        parts.append(f"{expr} {'<=' if rng.hi_incl else '<'} ?")
        params.append(conv(rng.hi))
    return " AND ".join(parts) or "1", params


def _in(ctx: _Ctx, col: str, source: str, cond: str) -> str:
    """`file IN (SELECT col FROM source WHERE cond)`, or per-row EXISTS when correlated.

    The IN form lets SQLite drive a whole search from the smallest list; the EXISTS form is
    a primary-key probe, for checking a few known candidates (ranked pages).
    """
    if ctx.correlated:
        return f"EXISTS (SELECT 1 FROM {source} WHERE {col} = {ctx.file_sql} AND {cond})"
    return f"{ctx.file_sql} IN (SELECT {col} FROM {source} WHERE {cond})"


def _scores_sub(term: Tag, ctx: _Ctx, cond: str, cparams: list[object]) -> tuple[str, list]:
    ids, params = _tag_ids(term)
    msql, mparams = _model_clause("s", ctx, probe=ctx.correlated)
    sql = _in(ctx, "s.file_id", "scores s", f"s.tag_id IN ({ids}) AND {cond}{msql}")
    return sql, [*params, *cparams, *mparams]


def _where(node: Node, ctx: _Ctx) -> Compiled:
    f = ctx.file_sql
    if isinstance(node, Tag):
        sub, params = _scores_sub(node, ctx, "s.selected = 1", [])
        if ctx.reviews:
            return _reviewed(node, ctx, sub, params)
        return Compiled(sub, params)
    if isinstance(node, Score):
        cond, cparams = _range_sql("s.score", node.range)
        sql, params = _scores_sub(node.tag, ctx, cond, cparams)
        if node.range.contains(0.0):
            ids, iparams = _tag_ids(node.tag)
            msql, mparams = _model_clause("g", ctx)
            absent = _in(
                ctx,
                "g.file_id",
                "taggings g",
                f"1{msql} AND NOT EXISTS (SELECT 1 FROM scores s WHERE s.file_id = g.file_id "
                f"AND s.model_id = g.model_id AND s.tag_id IN ({ids}))",
            )
            sql += f" OR {absent}"
            params += [*mparams, *iparams]
        return Compiled(f"({sql})", params)
    if isinstance(node, Rating):
        marks = ", ".join("?" * len(node.names))
        sub, params = _scores_sub(
            Tag("*", "rating", node.column),
            ctx,
            f"s.selected = 1 AND s.tag_id IN "
            f"(SELECT id FROM tags WHERE namespace = 'rating' AND name IN ({marks}))",
            list(node.names),
        )
        return Compiled(sub, params)
    if isinstance(node, Model):
        if ctx.untagged:
            return Compiled("1")
        return Compiled(
            _in(ctx, "file_id", "taggings", "model_id = (SELECT id FROM models WHERE name = ?)"),
            [node.name],
        )
    if isinstance(node, Flag):
        if node.name in ("reviewed", "source:human"):
            if not ctx.reviews:
                return Compiled("0")
            cond = "1" if node.name == "reviewed" else "r.verdict = 1"
            return Compiled(_in(ctx, "r.file_id", "reviews r", cond))
        if node.name == "untagged":
            msql, mparams = _model_clause("g", ctx)
            return Compiled(
                f"NOT EXISTS (SELECT 1 FROM taggings g WHERE g.file_id = {f}{msql})", mparams
            )
        if node.name in ("video", "animated"):
            # tagd.media: videos store their codec as format, animations GIF/PNG/WEBP.
            op = "NOT IN" if node.name == "video" else "IN"
            return Compiled(
                f"{f} IN (SELECT id FROM files WHERE duration IS NOT NULL "
                f"AND format {op} ('GIF', 'PNG', 'WEBP'))"
            )
        return _on_path(
            ctx, "EXISTS (SELECT 1 FROM jobs j WHERE j.path = {p} AND j.state = 'failed')", []
        )
    if isinstance(node, Similar):
        found = ctx.similar.get(node)
        if found is None:
            raise QueryError("similar: works only in tagd search", node.column, "")
        return Compiled(f"{f} IN (SELECT value FROM json_each(?))", [json.dumps(list(found))])
    if isinstance(node, FileFilter):
        return _file_filter(node, ctx)
    if isinstance(node, Not):
        inner = _where(node.term, ctx)
        return Compiled(f"NOT ({inner.sql})", inner.params)
    parts = [_where(t, ctx) for t in node.terms]
    joiner = " AND " if isinstance(node, And) else " OR "
    return Compiled(joiner.join(f"({p.sql})" for p in parts), [x for p in parts for x in p.params])


def _reviewed(term: Tag, ctx: _Ctx, sub: str, params: list[object]) -> Compiled:
    """A tag term with human verdicts: a rejected tag never matches, an accepted one always."""
    ids, iparams = _tag_ids(term)
    rejected = _in(ctx, "r.file_id", "reviews r", f"r.verdict = -1 AND r.tag_id IN ({ids})")
    accepted = _in(ctx, "r.file_id", "reviews r", f"r.verdict = 1 AND r.tag_id IN ({ids})")
    return Compiled(f"((({sub}) AND NOT {rejected}) OR {accepted})", [*params, *iparams, *iparams])


def _on_path(ctx: _Ctx, cond: str, params: list[object], mtime: bool = False) -> Compiled:
    """`cond` over a path expression {p} (and {m} = its mtime_ns)."""
    if ctx.path_sql is not None:
        return Compiled(cond.format(p=ctx.path_sql, m=ctx.mtime_sql or "NULL"), params)
    inner = cond.format(p="q.path", m="q.mtime_ns")
    return Compiled(
        f"EXISTS (SELECT 1 FROM paths q WHERE q.file_id = {ctx.file_sql} AND q.missing = 0 "
        f"AND {inner})",
        params,
    )


def _file_filter(node: FileFilter, ctx: _Ctx) -> Compiled:
    key = node.key
    if key == "path":
        pattern = os.path.expanduser(node.text)
        if not pattern.startswith(("/", "*")):
            pattern = "*/" + pattern
        mark, value = bind(pattern)
        return _on_path(ctx, f"{{p}} GLOB {mark}", [value])
    if key == "dir":
        text = os.path.expanduser(node.text)
        d = os.path.abspath(text).rstrip("/") + "/"
        if not text.startswith(("/", ".")) and not os.path.isdir(d):
            # Relative to a watch root, like path: globs: the folder at any depth.
            rel = "".join(f"[{c}]" if c in "[?*" else c for c in text.strip("/"))
            mark, value = bind(f"*/{rel}/*")
            return _on_path(ctx, f"{{p}} GLOB {mark}", [value])
        (low, lv), (high, hv) = bind(d), bind(d[:-1] + "0")
        return _on_path(ctx, f"({{p}} >= {low} AND {{p}} < {high})", [lv, hv])
    if key == "ext":
        exts = node.text.split(",")
        marks = [bind(f"%.{e}") for e in exts]
        cond = " OR ".join(f"{{p}} LIKE {mark}" for mark, _ in marks)
        return _on_path(ctx, f"({cond})", [value for _, value in marks])
    if key == "mtime":
        assert node.times is not None
        now = ctx.now

        def ns(b: TimeBound) -> int:
            return int(((now + b.seconds) if b.relative else b.seconds) * 1e9)

        cond, params = _range_sql("{m}", node.times, ns)
        return _on_path(ctx, f"({cond})", params)
    assert node.range is not None
    if key == "tags":
        msql, mparams = _model_clause("s", ctx)
        expr = (
            "(SELECT count(DISTINCT s.tag_id) FROM scores s "
            f"WHERE s.file_id = {ctx.file_sql} AND s.selected = 1{msql})"
        )
        cond, params = _range_sql(expr, node.range)
        return Compiled(f"({cond})", _repeat(mparams, params))
    column = {"width": "width", "height": "height", "size": "size", "duration": "duration"}[key]
    if ctx.files_sql is not None:
        cond, params = _range_sql(f"{ctx.files_sql}.{column}", node.range)
        return Compiled(f"coalesce({cond}, 0)", params)  # unknown (not hashed yet) = no match
    cond, params = _range_sql(column, node.range)
    return Compiled(f"{ctx.file_sql} IN (SELECT id FROM files WHERE {cond})", params)


def _repeat(mparams: list[object], params: list[object]) -> list[object]:
    """Params for a range over an expression that itself has params, once per bound."""
    out: list[object] = []
    for bound in params:
        out += [*mparams, bound]
    return out


def _score_condition(term: Tag | Score) -> tuple[str, list[object], str, list[object]]:
    """(tag-id subquery, its params, condition on `s`, its params) for a tag or a confidence
    filter: a tag counts where a model selected it, a filter on the stored score."""
    tag = term if isinstance(term, Tag) else term.tag
    ids, params = _tag_ids(tag)
    if isinstance(term, Tag):
        return ids, params, "s.selected = 1", []
    cond, cparams = _range_sql("s.score", term.range)
    return ids, params, cond, cparams


def _rank(node: Node, ctx: _Ctx) -> Compiled | None:
    f = ctx.file_sql
    if isinstance(node, Tag | Score):
        ids, params, cond, cparams = _score_condition(node)
        msql, mparams = _model_clause("s", ctx, probe=True)
        best = Compiled(
            f"coalesce((SELECT max(s.score) FROM scores s WHERE s.file_id = {f} "
            f"AND s.tag_id IN ({ids}) AND {cond}{msql}), 0)",
            [*params, *cparams, *mparams],
        )
        if ctx.reviews and isinstance(node, Tag):
            return Compiled(
                f"max({best.sql}, EXISTS (SELECT 1 FROM reviews r WHERE r.file_id = {f} "
                f"AND r.verdict = 1 AND r.tag_id IN ({ids})))",
                [*best.params, *params],
            )
        return best
    if isinstance(node, Similar):
        found = ctx.similar.get(node, {})
        return Compiled(
            f"coalesce(json_extract(?, '$.\"' || {f} || '\"'), 0)",
            [json.dumps({str(k): v for k, v in found.items()})],
        )
    if isinstance(node, And | Or):
        parts = [_rank(t, ctx) for t in node.terms]
        if isinstance(node, Or):
            if not any(parts):
                return None
            full = [p or Compiled("1") for p in parts]
            if len(full) == 1:
                return full[0]
            return _greatest(full)
        real = [p for p in parts if p is not None]
        if not real:
            return None
        return Compiled(" * ".join(p.sql for p in real), [x for p in real for x in p.params])
    return None


def _has_flag(node: Node, name: str) -> bool:
    return any(isinstance(n, Flag) and n.name == name for n in walk(node))


def _needs_jobs(node: Node) -> bool:
    return any(isinstance(n, Flag) and n.name in ("untagged", "failed") for n in walk(node))


def _similar_terms(node: Node) -> list[Similar]:
    return [n for n in walk(node) if isinstance(n, Similar)]


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


def build_sql(
    node: Node,
    opts: SearchOptions,
    *,
    count: bool = False,
    restrict: str | None = None,
    resolved: Resolved | None = None,
) -> Compiled:
    """The full SELECT: live paths of hashed files, plus unfinished jobs for untagged/failed.

    `restrict` (a JSON list of file ids: the candidates of a ranked page) checks only those
    files, probing each term per file instead of driving from whole tag lists.
    """
    if opts.sort not in SORTS:
        raise SearchError(f"unknown sort {opts.sort!r}: use one of {', '.join(SORTS)}")
    resolved = resolved or Resolved()
    now = time.time()
    model = scope_model(node)
    files_join = _uses_files(node)
    branches: list[Compiled] = []
    paths = "paths p"
    if restrict is not None:
        paths = "json_each(?) r CROSS JOIN paths p ON p.file_id = r.value"
    sources = [("p.file_id", paths, "p.missing = 0 AND p.file_id IS NOT NULL")]
    if _needs_jobs(node) and restrict is None:
        sources.append(
            (
                "-1",
                "(SELECT j.path AS path, NULL AS file_id, j.mtime_ns AS mtime_ns FROM jobs j "
                "WHERE j.state != 'done' AND NOT EXISTS "
                "(SELECT 1 FROM paths q WHERE q.path = j.path AND q.missing = 0)) p",
                "1",
            )
        )
    for file_col, source, base in sources:
        ctx = _Ctx(
            file_sql=file_col,
            path_sql="p.path",
            files_sql="f" if files_join else None,
            mtime_sql="p.mtime_ns",
            model=model,
            similar=resolved.similar,
            now=now,
            untagged=_has_flag(node, "untagged"),
            correlated=restrict is not None,
            model_ids=resolved.model_ids,
            reviews=resolved.reviews,
        )
        where = _where(node, ctx)
        rank = None if count or opts.sort != "score" else _rank(node, ctx)
        # No score outside --sort score: NULL, so no output shows a made-up 1.0.
        rank_sql, rank_params = (rank.sql, rank.params) if rank else ("NULL", [])
        join = " LEFT JOIN files f ON f.id = p.file_id" if files_join else ""
        branches.append(
            Compiled(
                f"SELECT p.path AS path, p.file_id AS file_id, p.mtime_ns AS mtime_ns, "
                f"{rank_sql} AS rank FROM {source}{join} WHERE {base} AND ({where.sql})",
                [*rank_params, *([] if restrict is None else [restrict]), *where.params],
            )
        )
    sql = " UNION ALL ".join(b.sql for b in branches)
    params = [x for b in branches for x in b.params]
    if count:
        return Compiled(f"SELECT count(*) FROM ({sql})", params)
    desc = _DEFAULT_DESC[opts.sort] if opts.descending is None else opts.descending
    direction = "DESC" if desc else "ASC"
    order = {
        "score": f"rank {direction}, path",
        "mtime": f"mtime_ns {direction}, path",
        "path": f"path {direction}",
        "random": "random()",
    }[opts.sort]
    sha = "(SELECT sha256 FROM files WHERE id = file_id)"
    if restrict is not None:
        return Compiled(f"SELECT path, file_id, NULL, mtime_ns, rank FROM ({sql})", params)
    if opts.limit is None and not opts.offset:
        return Compiled(
            f"SELECT path, file_id, {sha}, mtime_ns, rank FROM ({sql}) ORDER BY {order}", params
        )
    params += [-1 if opts.limit is None else opts.limit, opts.offset]
    return Compiled(
        f"SELECT path, file_id, {sha}, mtime_ns, rank FROM ({sql} ORDER BY {order} "
        f"LIMIT ? OFFSET ?) ORDER BY {order}",
        params,
    )


def _uses_files(node: Node) -> bool:
    return any(
        isinstance(n, FileFilter) and n.key in ("width", "height", "size", "duration")
        for n in walk(node)
    )


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
    ctx = _Ctx(model=scope_model(node), similar=resolved.similar)
    rows: Iterable[tuple] | None = _cached_top_k(conn, node, opts, resolved)
    if rows is None:
        driver = _driver(conn, node, opts)
        if driver is not None:
            walk = _driver_walk(conn, node, driver, resolved.reviews)
            rows = _top_k(conn, node, opts, resolved, walk)
        else:
            q = build_sql(node, opts, resolved=resolved)
            rows = conn.execute(q.sql, q.params)
    for path, file_id, sha, mtime_ns, rank in rows:
        tags = matched_scores(conn, file_id, wanted, ctx) if wanted and file_id else {}
        yield Hit(path, sha, tags, file_id, None if rank is None else float(rank), mtime_ns)


def _ranked_page(node: Node, opts: SearchOptions) -> bool:
    """A page of the best ranks, which can be found without ranking every match."""
    if opts.sort != "score" or opts.descending is False or opts.limit is None:
        return False
    return not _needs_jobs(node)


def _driver(
    conn: sqlite3.Connection, node: Node, opts: SearchOptions
) -> list[tuple[int, Tag | Score]] | None:
    """The top-level term to walk in score order for a ranked page: a tag, a confidence
    filter, or an OR of those (walked together)."""
    if not _ranked_page(node, opts):
        return None
    terms = node.terms if isinstance(node, And) else (node,)
    walkable: list[list[tuple[int, Tag | Score]]] = []
    for term in terms:
        branches = term.terms if isinstance(term, Or) else (term,)
        walks = [_walkable(conn, b) for b in branches]
        if all(w is not None for w in walks):
            walkable.append(walks)  # type: ignore[arg-type]
    if not walkable:
        return None
    # The shortest lists are the cheapest to walk; count with growing caps so that common
    # tags cost a few ms and only ties at a cap are counted further.
    sizes = {i: 0 for i in range(len(walkable))}
    for cap in DRIVER_COUNT_CAPS:
        for i in list(sizes):
            sizes[i] = sum(_walk_size(conn, tag_id, term, cap) for tag_id, term in walkable[i])
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
    if not _ranked_page(node, opts) or _similar_terms(node):
        return None
    db = _db_file(conn)
    try:
        meta = json.loads(Path(f"{db}.rank.json").read_text())
        cached = set(meta["tags"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    groups, listed = _cache_groups(conn, node, cached)
    if not groups or len(groups) + len(listed) < 2:
        return None
    if resolved.reviews and review.touches(conn, [t for g in (*groups, *listed) for t in g]):
        return None  # the cache bounds model scores only; a verdict can lift a rank to 1
    from tagd.index import changes
    from tagd.search import rankcache

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
            sizes = [
                sum(_walk_size(conn, t, None, DRIVER_COUNT_CAPS[0]) for t in group)
                for group in listed
            ]
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
        branches = term.terms if isinstance(term, Or) else (term,)
        walks = [_walkable(conn, b) for b in branches]
        if any(w is None or not isinstance(w[1], Tag) for w in walks):
            continue
        ids = [w[0] for w in walks]  # type: ignore[index]
        (held if all(t in cached for t in ids) else rare).append(ids)
    return held, rare


def _walkable(conn: sqlite3.Connection, term: Node) -> tuple[int, Tag | Score] | None:
    """(tag id, term) when `term` can be walked in score order: one tag, all matches stored."""
    tag = term if isinstance(term, Tag) else term.tag if isinstance(term, Score) else None
    if tag is None or tag.wildcard:
        return None
    if isinstance(term, Score) and term.range.contains(0.0):
        return None  # files without a stored score match too
    sql, params = _tag_ids(tag)
    ids = [r[0] for r in conn.execute(sql, params)]
    return (ids[0], term) if len(ids) == 1 else None  # type: ignore[return-value]


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
    return heapq.merge(*walks, key=lambda r: (-r[0], -r[1]))


def _accepted_walk(conn: sqlite3.Connection, tag_id: int) -> Iterator[tuple[float, int]]:
    """Files a human gave the tag: rank bound 1, in the walks' (score, file id) order."""
    yield from conn.execute(
        "SELECT 1.0, file_id FROM reviews WHERE tag_id = ? AND verdict = 1 ORDER BY file_id DESC",
        (tag_id,),
    )


def _greatest(parts: list[Compiled]) -> Compiled:
    """max() of many ranks, nested so that no call has more arguments than SQLite allows."""
    while len(parts) > 1:
        parts = [
            Compiled(
                "max(" + ", ".join(p.sql for p in chunk) + ")" if len(chunk) > 1 else chunk[0].sql,
                [x for p in chunk for x in p.params],
            )
            for chunk in (
                parts[i : i + MAX_FUNCTION_ARGS] for i in range(0, len(parts), MAX_FUNCTION_ARGS)
            )
        ]
    return parts[0]


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
    shas = dict(
        conn.execute(
            "SELECT id, sha256 FROM files WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps([r[1] for r in page]),),
        ).fetchall()
    )
    return [(path, fid, shas.get(fid), mtime, rank) for path, fid, _, mtime, rank in page]


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
    # Human verdicts change what a tag term matches; the bitmaps hold model selections only.
    if os.environ.get("TAGD_BITMAPS", "") != "off" and not resolved.reviews:
        from tagd.search import bitmaps

        def count_sql(restrict: str) -> tuple[str, Sequence[object]]:
            q = build_sql(node, opts, count=True, restrict=restrict, resolved=resolved)
            return q.sql, q.params

        fast = bitmaps.count(conn, _db_file(conn), node, tag_sql=_tag_ids, count_sql=count_sql)
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
    """The best stored score of each matched tag, keyed `namespace:name`."""
    ctx = ctx or _Ctx()
    out: dict[str, float] = {}
    for term in terms:
        ids, params, cond, cparams = _score_condition(term)
        msql, mparams = _model_clause("s", ctx)
        rows = conn.execute(
            "SELECT t.namespace, t.name, max(s.score) FROM scores s JOIN tags t ON t.id = s.tag_id"
            f" WHERE s.file_id = ? AND s.tag_id IN ({ids}) AND {cond}{msql} GROUP BY t.id",
            [file_id, *params, *cparams, *mparams],
        ).fetchall()
        for ns, name, score in rows:
            key = f"{ns}:{name}"
            out[key] = max(out.get(key, 0.0), float(score))
    return out


def explain(
    node: Node,
    conn: sqlite3.Connection | None = None,
    indent: int = 0,
    notes: dict[Tag, str] | None = None,
) -> str:
    """The parsed tree, one node a line, with the thresholds each tag term uses.

    `notes` marks tag terms the index does not know (tagd.suggest), so the reader sees
    which branch can never match.
    """
    pad = "  " * indent
    notes = notes or {}
    if isinstance(node, And | Or):
        head = "AND" if isinstance(node, And) else "OR"
        lines = (explain(t, conn, indent + 1, notes) for t in node.terms)
        return "\n".join([f"{pad}{head}", *lines])
    if isinstance(node, Not):
        return f"{pad}NOT\n{explain(node.term, conn, indent + 1, notes)}"
    if isinstance(node, Tag):
        ns = node.namespace or "any namespace"
        kind = "pattern" if node.wildcard else "tag"
        line = f"{pad}{kind} {node.name!r} ({ns}), selected by {_thresholds(node, conn)}"
        return line + (f"  [UNKNOWN: {notes[node]}]" if node in notes else "")
    if isinstance(node, Score):
        mark = f"  [UNKNOWN: {notes[node.tag]}]" if node.tag in notes else ""
        return (
            f"{pad}confidence of {node.tag.name!r} ({node.tag.namespace or 'any'}) in "
            f"{_fmt_range(node.range)} (unstored scores below the floor count as 0){mark}"
        )
    if isinstance(node, Rating):
        return f"{pad}rating in {', '.join(node.names)} (each model's top rating)"
    if isinstance(node, Model):
        return f"{pad}model {node.name!r}: every term uses only this model's predictions"
    if isinstance(node, Flag):
        return f"{pad}{node.name}"
    if isinstance(node, Similar):
        return f"{pad}similar to {node.ref!r} (cosine >= {node.min_sim})"
    shown = _fmt_range(node.range) if node.range else node.text
    return f"{pad}{node.key} {shown}"


def _fmt_range(r: Range) -> str:
    lo = "-inf" if r.lo is None else f"{r.lo:g}"
    hi = "inf" if r.hi is None else f"{r.hi:g}"
    return f"{'[' if r.lo_incl else '('}{lo}, {hi}{']' if r.hi_incl else ')'}"


def _thresholds(tag: Tag, conn: sqlite3.Connection | None) -> str:
    if conn is None:
        return "each model's thresholds"
    parts = []
    for name, settings in conn.execute("SELECT name, settings FROM models ORDER BY name"):
        try:
            th = json.loads(settings or "{}").get("thresholds", {})
        except ValueError:
            th = {}
        ns = tag.namespace or "general"
        parts.append(f"{name} {ns} {th.get(ns, 'default')}")
    return "; ".join(parts) or "each model's thresholds (no models yet)"


@dataclass(frozen=True)
class FileTags:
    path: str
    sha256: str
    width: int | None
    height: int | None
    models: dict[str, list[tuple[str, str, float, bool]]]


def file_tags(conn: sqlite3.Connection, path: str) -> FileTags | None:
    """Everything stored about the file at `path`: per model, (namespace, tag, score, selected)."""
    row = conn.execute(
        "SELECT f.id, f.sha256, f.width, f.height FROM paths p JOIN files f ON f.id = p.file_id "
        f"WHERE p.path = {AS_TEXT} AND p.missing = 0",
        (to_db(path),),
    ).fetchone()
    if row is None:
        return None
    models: dict[str, list[tuple[str, str, float, bool]]] = {}
    for model, ns, name, score, selected in conn.execute(
        """SELECT m.name, t.namespace, t.name, s.score, s.selected
           FROM scores s JOIN tags t ON t.id = s.tag_id JOIN models m ON m.id = s.model_id
           WHERE s.file_id = ? ORDER BY m.name, s.score DESC""",
        (row[0],),
    ):
        models.setdefault(model, []).append((ns, name, float(score), bool(selected)))
    for (model,) in conn.execute(
        "SELECT m.name FROM taggings t JOIN models m ON m.id = t.model_id WHERE t.file_id = ?",
        (row[0],),
    ):
        models.setdefault(model, [])
    return FileTags(path, row[1], row[2], row[3], models)
