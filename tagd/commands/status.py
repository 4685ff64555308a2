"""`tagd status`: daemon state, queue counts, models, provider, watcher health, last error."""

from __future__ import annotations

import argparse
import json

from tagd.commands import Context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="is the daemon running, and what is it doing",
        description="Daemon state, queue counts by state, models, ONNX Runtime provider in use, "
        "watcher health per root and the last error. Safe to run while the daemon works.",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.index.status import format_report, report

    roots = [str(root.path) for root in ctx.config.watch]
    r = report(ctx.db(readonly=True), roots, ctx.config.database)
    print(json.dumps(r, indent=2) if ctx.args.format == "json" else format_report(r))
    return 0
