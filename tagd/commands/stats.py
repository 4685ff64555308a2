"""`tagd stats`: what is in the index: files, per-model coverage, queue, size on disk."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from typing import Any

from tagd.commands import Context
from tagd.index import inventory
from tagd.ingest import scanner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="index statistics",
        description="Files and paths in the index, files tagged and embeddings per model, "
        "queue states (failed, queued) and the database size.",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def collect(conn: sqlite3.Connection, db_path: str) -> dict[str, Any]:
    counts = inventory.index_counts(conn, db_path)
    return {
        "files": counts.files,
        "paths": counts.paths,
        "missing_paths": counts.missing_paths,
        "untagged": _untagged(conn),
        "tags": counts.tags,
        "models": {
            name: {"tagged": tagged, "embeddings": emb}
            for name, (_, tagged, emb) in inventory.models_summary(conn).items()
        },
        "jobs": counts.jobs,
        "db_bytes": counts.db_bytes,
        "skipped": scanner.last_skipped(conn),
    }


def skipped_lines(skipped: dict[str, object] | None) -> list[str]:
    """Files the last complete scan passed over by extension, and folders it could not list."""
    if skipped is None:
        return ["skipped      (no complete scan yet)"]
    by_ext = skipped.get("by_extension") or {}
    assert isinstance(by_ext, dict)
    top = ", ".join(f"{ext} {n:,}" for ext, n in list(by_ext.items())[:8])
    more = ", …" if len(by_ext) > 8 else ""
    lines = [
        f"skipped      {skipped.get('files', 0):,} files by extension"
        + (f" ({top}{more})" if top else "")
    ]
    unlistable = skipped.get("unlistable", 0)
    if unlistable:
        lines.append(f"unlistable   {unlistable:,} folders could not be listed (permissions?)")
        examples = skipped.get("unlistable_examples") or []
        assert isinstance(examples, list)
        lines.extend(f"  {e}" for e in examples[:5])
    return lines


def _untagged(conn: sqlite3.Connection) -> int:
    """Exactly what `tagd search untagged` counts (live paths no model processed, queued and
    failed ones included), so the two never disagree."""
    from tagd.search.execute import count
    from tagd.search.query import parse

    return count(conn, parse("untagged"))


def run(ctx: Context) -> int:
    db_path = str(ctx.config.database)
    info = collect(ctx.db(readonly=True), db_path)
    if ctx.args.format == "json":
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    jobs = info["jobs"]
    lines = [
        f"files        {info['files']:,} ({info['paths']:,} paths, "
        f"{info['missing_paths']:,} missing)",
        f"untagged     {info['untagged']:,} (paths no model processed: `tagd search untagged`)",
        f"failed       {jobs['failed']:,} (queued {jobs['queued']:,}, running {jobs['running']:,})",
        f"tags         {info['tags']:,}",
        f"database     {db_path} ({info['db_bytes'] / 2**20:,.1f} MiB)",
    ]
    lines.extend(skipped_lines(info["skipped"]))
    for name, m in info["models"].items():
        lines.append(f"model {name}: {m['tagged']:,} files tagged, {m['embeddings']:,} embeddings")
    print("\n".join(lines))
    return 0
