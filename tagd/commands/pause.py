"""`tagd pause` / `tagd resume`: stop or restart tagging (persisted; the watcher keeps queueing)."""

from __future__ import annotations

import argparse

from tagd.commands import Context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pause",
        help="stop tagging after the batch in flight (kept across restarts)",
        description="Pause the daemon's worker. Files keep being queued; `tagd resume` restarts "
        "tagging. The flag is stored in the database, so it survives a restart.",
    )
    p.set_defaults(func=pause)
    r = sub.add_parser("resume", help="resume tagging after `tagd pause`")
    r.set_defaults(func=resume)


def pause(ctx: Context) -> int:
    from tagd.index.jobs import set_paused

    set_paused(ctx.db(), True)
    print("paused: the daemon finishes its batch in flight, then waits for `tagd resume`")
    return 0


def resume(ctx: Context) -> int:
    from tagd.index.jobs import set_paused

    set_paused(ctx.db(), False)
    print("resumed")
    return 0
