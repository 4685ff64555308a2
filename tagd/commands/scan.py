"""`tagd scan`: one pass over the watched folders, tagging whatever is new or changed."""

from __future__ import annotations

import argparse
import logging
import time
from typing import TYPE_CHECKING

from tagd.commands import Context, UserError

if TYPE_CHECKING:
    from tagd.config import Config
    from tagd.index.db import Connection
    from tagd.tagging.pipeline import Outcome
    from tagd.tagging.tagger import Tagger

log = logging.getLogger("tagd.scan")
PUBLISH_EVERY_S = 2.0


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
    from tagd.ingest import scanner
    from tagd.tagging.hub import ModelError

    config = ctx.config
    if not config.watch:
        raise UserError("nothing to scan: add a folder under `watch:` in the config", 2)
    for i, root in enumerate(config.watch):
        if not root.path.exists():
            raise UserError(
                f"watch[{i}].path: {root.path} does not exist; create or mount it, or fix the "
                f"path in {config.source or 'the config'}",
                2,
            )
    conn = ctx.db()
    taggers: list[Tagger] = []
    skipped: list[tuple[str, str]] = []
    if not ctx.args.no_tag:
        if config.cluster is None and config.inference.decode_workers != 0:
            from tagd.tagging import workers

            workers.prestart()  # its start overlaps the model load
        taggers, skipped = _load_models(config)
    result = scanner.scan(conn, config)
    log.info(
        "found %d image%s, %d new or changed",
        result.seen,
        "" if result.seen == 1 else "s",
        result.queued,
    )
    if ctx.args.no_tag:
        return 0
    from tagd import cluster
    from tagd.index import jobs
    from tagd.progress import Progress

    try:
        pipeline = cluster.pipeline_for(conn, config, taggers)
    except ModelError as exc:
        raise UserError(str(exc)) from None
    extra = scanner.queue_untagged(conn, pipeline.model_ids)
    if extra:
        log.info("%d known images lack results from a configured model", extra)
    runnable = jobs.counts(conn)["queued"] - jobs.waiting(conn)
    publisher = _Publisher(config, runnable)
    try:
        with Progress("tagging", total=runnable, unit="images") as bar:

            def progress(o: Outcome) -> None:
                n = o.done + o.failed + o.retrying
                bar.update(n, note=f"{o.done} tagged, {o.failed} failed")
                publisher.publish(n, bar.rate(), o.done, o.failed)

            pipeline.on_progress = progress
            outcome = pipeline.run()
    except ModelError as exc:
        raise UserError(str(exc)) from None
    finally:
        pipeline.close()
        publisher.close()
    waiting = jobs.waiting(conn)
    bar.done = outcome.done + outcome.failed
    line = f"tagged {outcome.done}, failed {outcome.failed} {bar.summary()}"
    if waiting:
        line += f", {waiting} waiting to retry (`tagd run` or a later scan picks them up)"
    for name, reason in skipped:
        line += f"; skipped model {name}: {reason}"
    log.info("%s", line)
    if outcome.done:
        from tagd.search import rankcache

        log.info("search ranking cache: %s", rankcache.refresh(conn, config.database))
        from tagd.search import bitmaps

        log.info("search bitmaps: %s", bitmaps.refresh(conn, config.database))
        from tagd.search import ann, similar

        if ann.enabled():
            for state in similar.refresh_ann(conn, config.database, at_once=True):
                log.info("similar index: %s", state)
    return 3 if skipped else 0


class _Publisher:
    """Publishes the scan's progress for `tagd status` (its own connection, every 2 s)."""

    def __init__(self, config: Config, total: int) -> None:
        from tagd.index import db

        self.total = total
        self.last = 0.0
        try:
            self.conn: Connection | None = db.connect(config.database)
        except (db.DatabaseError, db.SQLiteError) as exc:
            log.debug("scan progress not published: %s", exc)
            self.conn = None
        self.publish(0, 0.0, 0, 0)

    def publish(self, done: int, rate: float, tagged: int, failed: int) -> None:
        from tagd.index import db, status

        now = time.monotonic()
        if self.conn is None or (done and now - self.last < PUBLISH_EVERY_S):
            return
        self.last = now
        try:
            status.publish_scan(self.conn, done, self.total, rate, tagged=tagged, failed=failed)
        except db.SQLiteError as exc:
            log.debug("scan progress not published: %s", exc)

    def close(self) -> None:
        from tagd.index import db, status

        if self.conn is None:
            return
        try:
            status.clear_scan(self.conn)
        except db.SQLiteError as exc:
            log.debug("scan progress not cleared: %s", exc)
        self.conn.close()
        self.conn = None


def _load_models(config: Config) -> tuple[list[Tagger], list[tuple[str, str]]]:
    """Every enabled model that loads; the others as (name, reason), so one unreachable
    model does not stop the rest from tagging."""
    from tagd.tagging import tagger
    from tagd.tagging.hub import ModelError

    chosen = [m for m in config.models if m.enabled]
    if not chosen:
        raise UserError("no enabled models in the config: add one under `models:`")
    loaded, skipped = [], []
    for model in chosen:
        try:
            t = tagger.load(config, model)
        except ModelError as exc:
            skipped.append((model.name, str(exc)))
            continue
        log.info("model %s (%s) ready on %s", t.name, t.files.revision, t.provider)
        loaded.append(t)
    if not loaded:
        raise UserError("; ".join(reason for _, reason in skipped))
    for _, reason in skipped:
        log.error("%s; tagging with the other models", reason)
    return loaded, [(name, reason.split(": ", 1)[-1]) for name, reason in skipped]
