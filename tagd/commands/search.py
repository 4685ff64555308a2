"""`tagd search QUERY`: matching paths (exit 0 matches, 1 none, 2 bad query).

Kept light: no numpy/onnxruntime/PIL unless the query has a `similar:` term.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from tagd.commands import Context, UserError

if TYPE_CHECKING:
    from tagd.search.types import Hit

FORMATS = ("paths", "json", "jsonl", "tsv")
MAX_ROWS = 2**63 - 1  # SQLite's largest integer
NUL_FLAG = "-0"

SYNTAX = """query syntax:
  1girl solo -monochrome        space = AND, -tag = NOT (AND and NOT as words work too)
  (smile | grin) OR blush       | or OR, with parentheses
  character:hatsune_miku        namespace:tag; character:* and hat* are wildcards
  "long hair"                   quoted spaces match underscores
  1girl:>0.8  smile:0.3..0.5    confidence of a tag (stored scores; below the floor = 0)
  rating:<=sensitive            general < sensitive < questionable < explicit
  model:NAME                    only that model's predictions
  path:GLOB dir:PATH ext:png,webp width:>=1920 height:<1000 size:>2MB
  mtime:-7d.. tags:<5 untagged failed similar:PATH[:>=0.9]

examples:
  tagd search "1girl solo -monochrome"
  tagd search 'character:* -rating:>sensitive' --sort mtime --limit 20
  tagd search 'ext:png size:>2MB' -0 | xargs -0 ls -l
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="find images by tags",
        description="Print the absolute paths of images whose tags match QUERY, best match "
        "first (the product of the matched tags' confidences). -0 separates paths with NUL.",
        epilog=SYNTAX,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # so `-hair` is a query term, not -h with an argument
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("query", nargs="+", help="the query (several words are joined with spaces)")
    p.add_argument("--format", choices=FORMATS, default="paths")
    p.add_argument("--null", action="store_true", help="NUL-separated paths (same as -0)")
    p.add_argument(
        "--sort",
        choices=("score", "mtime", "path", "random"),
        default="score",
        help="score (default, best first), mtime (newest first), path, random",
    )
    order = p.add_mutually_exclusive_group()
    order.add_argument("--asc", dest="descending", action="store_false", default=None)
    order.add_argument("--desc", dest="descending", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="at most N results")
    p.add_argument("--offset", type=int, default=0, help="skip the first N results")
    p.add_argument("--count", action="store_true", help="print the number of matches only")
    p.add_argument("--explain", action="store_true", help="print the parsed query and exit")
    p.add_argument("--sql", action="store_true", help="print the SQL and its parameters and exit")
    p.set_defaults(func=run, query_terms_from_options=True)


def split_flags(words: list[str]) -> tuple[list[str], bool]:
    """Pull the `-0` flag out of the query words (argparse passes it through as a term)."""
    rest = [w for w in words if w != NUL_FLAG]
    return rest, len(rest) != len(words)


def run(ctx: Context) -> int:
    from tagd.names import for_humans
    from tagd.search.compile import build_sql
    from tagd.search.execute import count, iter_search, resolve_similar
    from tagd.search.explain import explain
    from tagd.search.query import QueryError, parse
    from tagd.search.suggest import unknown_tags
    from tagd.search.types import Resolved, SearchError, SearchOptions

    args = ctx.args
    words, nul = split_flags(args.query)
    nul = nul or args.null
    text = " ".join(words)
    if args.limit is not None and not 1 <= args.limit <= MAX_ROWS:
        raise UserError(
            f"--limit {args.limit}: give a number from 1 to {MAX_ROWS}, or leave --limit out "
            "for every match",
            2,
        )
    if not 0 <= args.offset <= MAX_ROWS:
        raise UserError(f"--offset {args.offset}: give a number from 0 to {MAX_ROWS}", 2)
    try:
        node = parse(text)
    except QueryError as exc:
        raise UserError(f"bad query:\n{exc.caret()}", 2) from None
    opts = SearchOptions(
        sort=args.sort,
        descending=args.descending,
        limit=args.limit,
        offset=args.offset,
        with_tags=args.format != "paths",
    )
    if args.explain:
        conn = ctx.db(readonly=True) if _db_exists(ctx) else None
        notes = {u.term: u.message for u in unknown_tags(conn, node)} if conn else {}
        print(for_humans(explain(node, conn, notes=notes), keep_newlines=True))
        return 0
    conn = ctx.db(readonly=True)
    for unknown in unknown_tags(conn, node):
        print(f"tagd: {unknown.message}", file=sys.stderr)
    try:
        similar = resolve_similar(conn, node, str(ctx.config.database))
        if args.sql:
            q = build_sql(node, opts, count=args.count, resolved=Resolved(similar=similar))
            print(q.sql)
            print(json.dumps(q.params, default=os.fsdecode))
            return 0
        if args.count:
            n = count(conn, node, opts, similar=similar)
            print(n)
            return 0 if n else 1
        n = write_hits(iter_search(conn, node, opts, similar=similar), args.format, nul, sys.stdout)
    except SearchError as exc:
        raise UserError(str(exc), 2) from None
    return 0 if n else 1


def _db_exists(ctx: Context) -> bool:
    from pathlib import Path

    return Path(ctx.config.database).exists()


def hit_record(h: Hit) -> dict[str, object]:
    """`path_b64` (the exact bytes) is added for a name that is not UTF-8."""
    from tagd.names import json_path

    return {
        **json_path(h.path),
        "sha256": h.sha256,
        "score": None if h.rank is None else round(h.rank, 6),
        "tags": {k: round(v, 4) for k, v in h.tags.items()},
    }


def write_hits(hits: Iterable[Any], fmt: str, nul: bool, out: TextIO) -> int:
    """Stream hits in `fmt`; returns how many. Paths go out as their exact bytes, except
    on a terminal (escaped for humans) and in tsv (tab, newline, CR and backslash escaped)."""
    from tagd.names import for_humans, tsv_field

    human = fmt == "paths" and not nul and out.isatty()
    n = 0
    if fmt == "json":
        records = [hit_record(h) for h in hits]
        json.dump(records, out, indent=2)
        out.write("\n")
        return len(records)
    end = "\0" if nul else "\n"
    for h in hits:
        n += 1
        if fmt == "jsonl":
            out.write(json.dumps(hit_record(h)) + "\n")
        elif fmt == "tsv":
            tags = ",".join(f"{k}={v:.4f}" for k, v in h.tags.items())
            score = "" if h.rank is None else f"{h.rank:.6f}"
            out.write(f"{tsv_field(h.path)}\t{score}\t{h.sha256 or ''}\t{tags}\n")
        else:
            out.write((for_humans(h.path) if human else h.path) + end)
    return n
