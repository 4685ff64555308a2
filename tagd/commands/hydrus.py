"""`tagd hydrus sync`: push effective tags to a Hydrus tag service through the Client API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from tagd.commands import Context, UserError
from tagd.index import inventory

EPILOG = """examples:
  tagd hydrus sync --dry-run      # show what would be added, change nothing
  tagd hydrus sync                # add missing tags to files Hydrus knows
  TAGD_HYDRUS_ACCESS_KEY=... tagd hydrus sync --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "hydrus",
        help="sync tags to Hydrus",
        description="Work with a Hydrus client through its Client API (see `hydrus:` in the "
        "config).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hs = p.add_subparsers(dest="hydrus_command", metavar="ACTION", required=True)
    s = hs.add_parser(
        "sync",
        help="add each file's effective tags to the Hydrus tag service",
        description="Add each file's effective tags (Hydrus style: spaces, character:/rating:/"
        "creator: namespaces) to the configured Hydrus tag service, by SHA-256, for files "
        "Hydrus knows. Only changed files are checked; tags deleted in Hydrus are never re-added.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--dry-run", action="store_true", help="print what would be added; send nothing")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=run_sync)


def run_sync(ctx: Context) -> int:
    from tagd.hydrus import sync as hydrus
    from tagd.progress import Progress

    conn = ctx.db()
    try:
        with Progress("hydrus sync", unit="files") as bar:
            report = hydrus.sync(conn, ctx.config, dry_run=ctx.args.dry_run, progress=bar.update)
    except hydrus.HydrusError as exc:
        raise UserError(str(exc), 3) from None
    except ValueError as exc:
        raise UserError(hydrus.redact(str(exc)), 2) from None
    if ctx.args.json:
        json.dump(dataclasses.asdict(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif ctx.args.dry_run:
        sha_to_path = {}
        for sha in report.planned:
            sha_to_path[sha] = inventory.first_present_path(conn, sha) or sha
        for sha, tags in report.planned.items():
            for tag in tags:
                print(f"{sha_to_path[sha]}\t{tag}")
    print(f"tagd: {report.line()} {bar.summary()}", file=sys.stderr)
    return 0
