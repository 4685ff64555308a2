"""`tagd jobs`: list the queue, retry failed jobs, or queue files first in line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tagd.commands import Context, UserError

USER_PRIORITY = 10


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "jobs",
        help="list, retry or add jobs",
        description="Without an action: the unfinished jobs in the order they will run "
        "(--failed: failed jobs with their reason). `retry [PATH...]` queues failed jobs "
        "again; `add PATH...` queues files ahead of everything else.",
        epilog="examples:\n  tagd jobs --failed\n  tagd jobs retry\n  tagd jobs add ~/new.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=("list", "retry", "add"), default="list")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--failed", action="store_true", help="list failed jobs only")
    p.add_argument("--limit", type=int, default=50, help="list at most N jobs (default 50)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.index import jobs
    from tagd.names import for_humans, json_path

    action = ctx.args.action
    if action == "list":
        if ctx.args.paths:
            raise UserError("`tagd jobs` lists jobs; to queue files use `tagd jobs add PATH`", 2)
        rows = jobs.listing(
            ctx.db(readonly=True), "failed" if ctx.args.failed else None, ctx.args.limit
        )
        if ctx.args.format == "json":
            keys = ("state", "attempts", "priority", "error", "not_before")
            json.dump(
                [{**json_path(r["path"]), **{k: r[k] for k in keys}} for r in rows],
                sys.stdout,
                indent=2,
            )
            sys.stdout.write("\n")
            return 0
        now = time.time()
        for r in rows:
            extra = ""
            if r["state"] == "queued" and r["not_before"] > now:
                extra = f"  (retry in {r['not_before'] - now:.0f} s: {for_humans(r['error'])})"
            elif r["state"] == "failed":
                extra = f"  {for_humans(r['error'] or '')}"
            print(f"{r['state']:<8} {r['attempts']}  {for_humans(r['path'])}{extra}")
        return 0
    conn = ctx.db()
    if action == "retry":
        paths = [os.path.abspath(p) for p in ctx.args.paths] or None
        n = jobs.retry_failed(conn, paths)
        print(f"{n} failed job{'' if n == 1 else 's'} queued again")
        return 0 if n or paths is None else 1
    if not ctx.args.paths:
        raise UserError("`tagd jobs add` needs one or more image paths", 2)
    from tagd.index import db

    added = 0
    with db.write(conn):
        for raw in ctx.args.paths:
            path = os.path.abspath(raw)
            try:
                st = os.stat(path)
            except OSError as exc:
                raise UserError(f"{for_humans(raw)}: {exc.strerror or exc}", 1) from None
            added += jobs.enqueue(
                conn, path, st.st_size, st.st_mtime_ns, priority=USER_PRIORITY, requeue=True
            )
    print(f"{added} files queued first")
    return 0
