"""`tagd scan`: one pass over the watched folders, tagging whatever is new or changed."""

from __future__ import annotations

import argparse
import logging

from tagd.commands import Context, UserError

log = logging.getLogger("tagd.scan")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="find new or changed images, tag them, exit",
        description="Walk every watch root, queue new or changed images (and images a newly "
        "added model has not seen), then tag the queue and exit.",
        epilog="example: tagd --config config.yaml scan",
    )
    p.add_argument(
        "--no-tag", action="store_true", help="only queue files; leave tagging to `tagd run`"
    )
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd import scanner
    from tagd.hub import ModelError

    config = ctx.config
    if not config.watch:
        raise UserError("nothing to scan: add a folder under `watch:` in the config", 2)
    conn = ctx.db()
    taggers = []
    if not ctx.args.no_tag:
        from tagd import tagger

        try:
            taggers = tagger.load_all(config)
        except ModelError as exc:
            raise UserError(str(exc)) from None
    result = scanner.scan(conn, config)
    log.info("found %d images, %d new or changed", result.seen, result.queued)
    if ctx.args.no_tag:
        return 0
    from tagd import queue
    from tagd.pipeline import Pipeline
    from tagd.progress import Progress

    pipeline = Pipeline(conn, config, taggers)
    extra = scanner.queue_untagged(conn, pipeline.model_ids)
    if extra:
        log.info("%d known images lack results from a configured model", extra)
    runnable = queue.counts(conn)["queued"] - queue.waiting(conn)
    try:
        with Progress("tagging", total=runnable) as bar:
            pipeline.on_progress = lambda o: bar.update(o.done + o.failed + o.retrying)
            outcome = pipeline.run()
    except ModelError as exc:
        raise UserError(str(exc)) from None
    finally:
        pipeline.close()
    waiting = queue.waiting(conn)
    log.info(
        "tagged %d, failed %d%s",
        outcome.done,
        outcome.failed,
        f", {waiting} waiting to retry (`tagd run` or a later scan picks them up)"
        if waiting
        else "",
    )
    for path, reason in outcome.errors[:20]:
        log.warning("  %s: %s", path, reason)
    if outcome.done:
        from tagd import rankcache

        log.info("search ranking cache: %s", rankcache.refresh(conn, config.database))
        from tagd import bitmaps

        log.info("search bitmaps: %s", bitmaps.refresh(conn, config.database))
        from tagd import ann

        for outcome in ann.refresh(conn, config.database):
            log.info("similar index: %s", outcome)
    return 0
