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
        "stored embeddings, best first. The index is built on first use and cached next to "
        "the database.",
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
    from tagd.search import ann
    from tagd.search.similar import EmbeddingIndex, SimilarError, paths_of, resolve_ref
    from tagd.search.types import Hit

    args = ctx.args
    if args.limit < 1:
        raise UserError("--limit takes a number >= 1", 2)
    if args.min_sim is not None and not -1 <= args.min_sim <= 1:
        raise UserError("--min-sim takes a cosine similarity between -1 and 1", 2)
    conn = ctx.db(readonly=True)
    if args.model is not None:
        from tagd.index.inventory import require_model_id

        require_model_id(conn, args.model)
    try:
        file_id = resolve_ref(conn, args.ref)
        index = EmbeddingIndex.open(conn, ctx.config.database, args.model)
        if not args.exact and ann.enabled():
            index = index.with_ann(conn, ctx.config.database)
        found = index.nearest_to_file(
            file_id, limit=args.limit * 2, min_sim=args.min_sim, exact=args.exact
        )
    except SimilarError as exc:
        raise UserError(str(exc), 1) from None
    where = paths_of(conn, [fid for fid, _ in found])
    hits = [Hit(where[fid][0], where[fid][1], {}, fid, sim) for fid, sim in found if fid in where][
        : args.limit
    ]
    n = write_hits(hits, args.format, args.null, sys.stdout)
    return 0 if n else 1
