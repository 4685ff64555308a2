"""`tagd dupes`: exact duplicates (same content) and near-duplicate groups (embeddings)."""

from __future__ import annotations

import argparse
import json
import sys

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dupes",
        help="list duplicate and near-duplicate images",
        description="Print groups of files with the same content (sha256), then groups whose "
        "embeddings have cosine similarity >= --min-sim. Groups are separated by a blank line. "
        "Up to 20,000 files every pair is compared; above, random-projection LSH compares only "
        "likely pairs (a pair at exactly --min-sim is found with 99% probability, closer pairs "
        "almost surely): about a minute per million files. --ann compares every file's nearest "
        "neighbours in the HNSW index instead (each reported pair exactly; slower and less "
        "complete than LSH on the benchmark so far).",
        epilog="example: tagd dupes --min-sim 0.98 --format json",
    )
    p.add_argument("--min-sim", type=float, default=0.97, help="near-duplicate cosine (0.97)")
    p.add_argument("--model", help="whose embeddings (default: the first model that has them)")
    p.add_argument("--exact-only", action="store_true", help="skip the embedding comparison")
    p.add_argument(
        "--exhaustive", action="store_true", help="compare every pair, however many files (slow)"
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--exact", action="store_true", help="compare the exact matrix (the default)")
    how.add_argument(
        "--ann", action="store_true", help="pairs from the HNSW index's nearest neighbours"
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.names import for_humans, is_utf8, json_path, json_text, path_b64
    from tagd.search.similar import SimilarError, duplicate_groups, exact_duplicates, paths_of

    args = ctx.args
    if not 0 < args.min_sim <= 1:
        raise UserError("--min-sim takes a cosine similarity in (0, 1]", 2)
    conn = ctx.db(readonly=True)
    if args.model is not None:
        from tagd.index.inventory import require_model_id

        require_model_id(conn, args.model)
    exact = [{"sha256": sha, "paths": paths} for sha, paths in exact_duplicates(conn)]
    near: list[list[dict[str, object]]] = []
    if not args.exact_only:
        try:
            groups = duplicate_groups(
                conn,
                ctx.config.database,
                args.model,
                args.min_sim,
                use_index=args.ann,
                exhaustive=args.exhaustive or None,
            )
        except SimilarError as exc:
            print(f"tagd: near duplicates skipped: {exc}", file=sys.stderr)
        else:
            where = paths_of(conn, [fid for g in groups for fid, _ in g])
            for g in groups:
                members = [
                    {"path": where[fid][0], "sha256": where[fid][1], "similarity": round(s, 4)}
                    for fid, s in g
                    if fid in where
                ]
                if len(members) > 1:
                    near.append(members)
    if args.format == "json":
        for e in exact:
            raw: list[str] = e["paths"]  # type: ignore[assignment]
            e["paths"] = [json_text(p) for p in raw]
            if not all(is_utf8(p) for p in raw):
                e["paths_b64"] = [path_b64(p) for p in raw]
        for members in near:
            for m in members:
                m.update(json_path(str(m.pop("path"))))
        json.dump({"exact": exact, "near": near}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        blocks = [
            "\n".join([f"# exact {e['sha256']}", *map(for_humans, e["paths"])]) for e in exact
        ]
        blocks += [
            "\n".join(
                [f"# similar >= {args.min_sim}"]
                + [f"{for_humans(str(m['path']))}\t{m['similarity']}" for m in g]
            )
            for g in near
        ]
        if blocks:
            print("\n\n".join(blocks))
    return 0 if exact or near else 1
