"""`tagd similar PATH|SHA256`: the nearest images by embedding cosine similarity."""

from __future__ import annotations

import argparse
import sys

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "similar",
        help="find images that look like one image",
        description="Print the files nearest to PATH (or a sha256) by cosine similarity of the "
        "stored embeddings, best first. From 50,000 embeddings on, `tagd scan` and the daemon "
        "keep an HNSW index beside the database: its candidates are scored exactly (it may miss "
        "a neighbour; --exact scans every file). Without it, the exact matrix is built on "
        "first use and cached next to the database. TAGD_ANN=off turns the index off.",
        epilog="example: tagd similar ~/gallery/img001.jpg --limit 10 --format tsv",
    )
    p.add_argument("ref", metavar="PATH|SHA256", help="an indexed image path or its sha256")
    p.add_argument("--model", help="whose embeddings (default: the first model that has them)")
    p.add_argument("--limit", type=int, default=20, help="at most N results (default 20)")
    p.add_argument("--min-sim", type=float, default=None, help="only cosine >= this (0..1)")
    p.add_argument("--format", choices=("paths", "json", "jsonl", "tsv"), default="paths")
    p.add_argument("-0", "--null", action="store_true", help="NUL-separated paths")
    p.add_argument(
        "--exact",
        action="store_true",
        help="score every file instead of the HNSW index's candidates (slower, no misses)",
    )
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.commands.search import write_hits
    from tagd.search.types import Hit

    args = ctx.args
    if args.limit < 1:
        raise UserError("--limit takes a number >= 1", 2)
    if args.min_sim is not None and not -1 <= args.min_sim <= 1:
        raise UserError("--min-sim takes a cosine similarity between -1 and 1", 2)
    if not args.exact:
        from tagd.service import queries

        request = {"op": "similar", "ref": args.ref, "model": args.model}
        reply = queries.ask(
            ctx.config.database, {**request, "limit": args.limit, "min_sim": args.min_sim}
        )
        if reply is not None:
            if "error" in reply:
                raise UserError(str(reply["error"]), int(reply.get("rc", 1)))
            hits = [Hit(p, sha, {}, int(fid), float(sim)) for p, sha, fid, sim in reply["hits"]]
            n = write_hits(hits, args.format, args.null, sys.stdout)
            return 0 if n else 1
    from tagd.search.similar import SimilarError, listed, nearest_files, resolve_ref

    conn = ctx.db(readonly=True)
    if args.model is not None:
        from tagd.index.inventory import require_model_id

        require_model_id(conn, args.model)
    try:
        file_id = resolve_ref(conn, args.ref)
        found = nearest_files(
            conn,
            ctx.config.database,
            args.model,
            file_id,
            limit=args.limit * 2,
            min_sim=args.min_sim,
            exact=args.exact,
        )
    except SimilarError as exc:
        raise UserError(str(exc), 1) from None
    hits = [Hit(p, sha, {}, fid, sim) for p, sha, fid, sim in listed(conn, found, args.limit)]
    n = write_hits(hits, args.format, args.null, sys.stdout)
    return 0 if n else 1
