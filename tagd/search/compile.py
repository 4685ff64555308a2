"""Compile a parsed query to SQL. User text only ever reaches SQL as parameters.

A tag term matches a file when any model selected that tag for it (each model's own
thresholds were applied when the scores were stored or reindexed); `model:NAME` narrows
every term to that model. Confidence filters read the stored score itself: a file the model
processed without a stored score for the tag (it was below the floor, default 0.05) counts
as score 0. Results rank by the product of the matched tags' confidences (best branch of
an OR; similarity for `similar:`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tagd.names import bind
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
from tagd.search.types import SORTS, Resolved, SearchError, SearchOptions

MAX_FUNCTION_ARGS = 100  # SQLite's default SQLITE_MAX_FUNCTION_ARG is 127
_DEFAULT_DESC = {"score": True, "mtime": True, "path": False, "random": False}


@dataclass
class Compiled:
    sql: str
    params: list[object] = field(default_factory=list)


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


def _has_flag(node: Node, name: str) -> bool:
    return any(isinstance(n, Flag) and n.name == name for n in walk(node))


def _needs_jobs(node: Node) -> bool:
    return any(isinstance(n, Flag) and n.name in ("untagged", "failed") for n in walk(node))


def _similar_terms(node: Node) -> list[Similar]:
    return [n for n in walk(node) if isinstance(n, Similar)]


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
