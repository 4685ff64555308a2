"""`tagd reindex`: apply changed thresholds, blacklist and aliases without decoding images."""

from __future__ import annotations

import argparse
import logging

from tagd.commands import Context, UserError

log = logging.getLogger("tagd.reindex")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reindex",
        help="re-apply thresholds, blacklist and aliases to the whole index",
        description="Recompute which stored scores are selected tags, from stored scores (a "
        "threshold above the stored floor) or stored embeddings x the model head (below it). "
        "No image is read.",
        epilog="example: tagd reindex --model wd-vit-tagger-v3",
    )
    p.add_argument("--model", action="append", help="only this model (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd import families, reindex
    from tagd.progress import Progress

    config = ctx.config
    chosen = [m for m in config.models if not ctx.args.model or m.name in ctx.args.model]
    missing = set(ctx.args.model or ()) - {m.name for m in chosen}
    if missing:
        raise UserError(f"no model named {sorted(missing)[0]!r} in the config", 2)
    conn = ctx.db()
    retag: list[str] = []
    for m in chosen:
        family = families.get(m.family, config.families)
        thresholds = {**family.thresholds, **m.thresholds}
        total = conn.execute(
            "SELECT count(*) FROM taggings t JOIN models m ON m.id = t.model_id WHERE m.name = ?",
            (m.name,),
        ).fetchone()[0]
        enabled = False if ctx.args.no_progress else None
        with Progress(m.name, enabled=enabled, total=total) as bar:
            report = reindex.reindex_model(
                conn,
                name=m.name,
                thresholds=thresholds,
                tag_rules=config.tags,
                floor=config.floor_for(m),
                progress=bar.advance,
            )
        log.info(
            "%s: %d files (%d from stored scores, %d from embeddings), %d rows changed, %.1f s",
            m.name,
            report.files,
            report.from_scores,
            report.from_embeddings,
            report.changed_rows,
            report.seconds,
        )
        if report.approximate_mcut:
            log.warning(
                "%s: %d files have no embedding: mcut was computed from the stored scores only",
                m.name,
                report.approximate_mcut,
            )
        if report.need_retag:
            log.warning(
                "%s: %d files have no embedding and a threshold is below their stored floor; "
                "their lower scores need `tagd retag --model %s --all`",
                m.name,
                len(report.need_retag),
                m.name,
            )
            retag.append(m.name)
    from tagd import rankcache

    log.info("search ranking cache: %s", rankcache.refresh(conn, config.database))
    from tagd import bitmaps

    log.info("search bitmaps: %s", bitmaps.refresh(conn, config.database))
    return 1 if retag else 0
