"""`tagd retag --model NAME [QUERY]`: queue files for one model through the durable jobs."""

from __future__ import annotations

import argparse
import logging

from tagd.commands import Context, UserError

log = logging.getLogger("tagd.retag")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retag",
        help="queue files a model has not tagged (or, with --all, every matching file)",
        description="Queue the indexed files that MODEL has not tagged yet, or with --all every "
        "matching file, limited to those matching QUERY. `tagd scan` or the daemon tags them.",
        epilog='example: tagd retag --model wd-eva02-large-tagger-v3 --all "1girl -monochrome"',
    )
    p.add_argument("--model", required=True, help="a model name from the config")
    p.add_argument("--all", action="store_true", help="also files the model already tagged")
    p.add_argument("query", nargs="*", help="only files matching this search query")
    p.set_defaults(func=run, query_terms_from_options=True)


def run(ctx: Context) -> int:
    from tagd.config import ConfigError
    from tagd.index import db, inventory, jobs

    config = ctx.config
    try:
        model = config.model(ctx.args.model)
    except ConfigError as exc:
        raise UserError(str(exc), 2) from None
    where, params = "1", []
    text = " ".join(ctx.args.query).strip()
    if text:
        from tagd.search.compile import compile_where
        from tagd.search.query import QueryError, parse

        try:
            compiled = compile_where(parse(text))
        except QueryError as exc:
            raise UserError(f"bad query: {exc}", 2) from None
        where, params = compiled.sql, list(compiled.params)
    import sys

    from tagd.progress import Progress

    conn = ctx.db()
    rows = inventory.paths_to_retag(
        conn,
        where,
        params,
        model=inventory.model_id(conn, model.name),
        include_tagged=ctx.args.all,
    )
    force = (model.name,) if ctx.args.all else ()
    queued = 0
    with Progress(f"retag {model.name}", total=len(rows), unit="files") as bar, db.write(conn):
        for i, r in enumerate(rows, 1):
            queued += jobs.enqueue(
                conn, r.path, r.size, r.mtime_ns, force_models=force, requeue=True
            )
            bar.update(i)
    print(
        f"tagd: retag {model.name}: queued {queued} of {len(rows)} matching files {bar.summary()}",
        file=sys.stderr,
    )
    files = "file" if len(rows) == 1 else "files"
    if not rows:
        lacking = "matches" if ctx.args.all else f"lacks results from {model.name}"
        print(f"nothing to queue: no file {lacking}")
        return 0
    print(
        f"queued {queued} of {len(rows)} matching {files} for {model.name}"
        + ("; `tagd run` or `tagd scan` tags them" if queued else "")
    )
    return 0
