"""`tagd reindex`: apply changed thresholds, blacklist and aliases without decoding images."""

from __future__ import annotations

import argparse
import logging

from tagd.commands import Context, UserError
from tagd.index import inventory

log = logging.getLogger("tagd.tagging.reindex")


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
    import sys
    import time

    from tagd.progress import Progress, summary
    from tagd.tagging import families, reindex

    config = ctx.config
    chosen = [m for m in config.models if not ctx.args.model or m.name in ctx.args.model]
    missing = set(ctx.args.model or ()) - {m.name for m in chosen}
    if missing:
        known = ", ".join(m.name for m in config.models) or "none configured"
        raise UserError(f"no model named {sorted(missing)[0]!r} in the config (models: {known})", 2)
    conn = ctx.db()
    from tagd.tagging import tagrules

    tag_rules = tagrules.effective(conn, config.tags)
    retag: list[str] = []
    started = time.monotonic()
    files = changed = 0
    for m in chosen:
        family = families.get(m.family, config.families)
        thresholds = {
            **family.thresholds,
            **reindex.model_file_thresholds(conn, m.name),
            **m.thresholds,
        }
        total = inventory.tagged_count(conn, m.name)
        enabled = False if ctx.args.no_progress else None
        with Progress(m.name, enabled=enabled, total=total, unit="files") as bar:
            report = reindex.reindex_model(
                conn,
                name=m.name,
                thresholds=thresholds,
                tag_rules=tag_rules,
                floor=config.floor_for(m),
                progress=bar.advance,
            )
        files += report.files
        changed += report.changed_rows
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
    from tagd.search import rankcache

    log.info("search ranking cache: %s", rankcache.refresh(conn, config.database))
    from tagd.search import bitmaps

    log.info("search bitmaps: %s", bitmaps.refresh(conn, config.database))
    print(
        f"tagd: reindexed {files} file{'' if files == 1 else 's'} for {len(chosen)} "
        f"model{'' if len(chosen) == 1 else 's'}, {changed} rows changed "
        f"{summary(files, time.monotonic() - started, 'files')}",
        file=sys.stderr,
    )
    return 1 if retag else 0
