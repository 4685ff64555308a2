"""`tagd search QUERY`: matching paths, one per line (exit 0 matches, 1 none, 2 bad query)."""

from __future__ import annotations

import argparse
import json
import sys

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="find images by tags",
        description="Print the absolute paths of images whose tags match QUERY. "
        "Space = AND, -tag = NOT, namespace:tag (rating:general, character:hatsune_miku).",
        epilog='examples:\n  tagd search "1girl solo -monochrome"\n'
        "  tagd search rating:general character:hatsune_miku --format json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="+", help="the query (several words are joined with spaces)")
    p.add_argument("--format", choices=("paths", "json"), default="paths")
    p.add_argument("--limit", type=int, default=None, help="at most N results")
    p.set_defaults(func=run, query_terms_from_options=True)


def run(ctx: Context) -> int:
    from tagd.query import QueryError, parse
    from tagd.search import search

    text = " ".join(ctx.args.query)
    try:
        node = parse(text)
    except QueryError as exc:
        raise UserError(f"bad query:\n{exc.caret()}", 2) from None
    hits = search(ctx.db(readonly=True), node, limit=ctx.args.limit)
    out = sys.stdout
    if ctx.args.format == "json":
        json.dump(
            [{"path": h.path, "sha256": h.sha256, "tags": h.tags} for h in hits], out, indent=2
        )
        out.write("\n")
    else:
        for h in hits:
            out.write(h.path + "\n")
    return 0 if hits else 1
