"""`tagd export`: the index as CSV / JSON Lines, or sidecar files next to the images."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from tagd.commands import Context, UserError

if TYPE_CHECKING:
    from tagd.index.db import Connection
    from tagd.outputs.effective import FileTagSet

EPILOG = """examples:
  tagd export --format csv > tags.csv                 # one row per path, model and tag
  tagd export --format jsonl "rating:general" > sfw.jsonl
  tagd export sidecars --style hydrus                 # image.jpg.txt, one tag per line
  tagd export sidecars "solo" --style kohya --exclude "simple background"
  tagd export sidecars --style json --overwrite       # also replace sidecars tagd did not write
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export tags (CSV, JSON Lines, sidecar files)",
        description="Without `sidecars`: write effective tags of the images matching QUERY "
        "(all images when omitted) to stdout as CSV or JSON Lines. With `sidecars`: write a "
        "sidecar next to each image; existing sidecars tagd did not write are kept unless "
        "--overwrite is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("query", nargs="*", help="`sidecars` and/or a search query")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv", help="index export format")
    p.add_argument("--model", action="append", help="only this model's tags (repeatable)")
    p.add_argument("--all", action="store_true", help="also stored scores below the threshold")
    g = p.add_argument_group("sidecars")
    g.add_argument("--style", choices=("hydrus", "kohya", "json"), default="hydrus")
    g.add_argument("--overwrite", action="store_true", help="replace sidecars tagd did not write")
    g.add_argument("--underscores", action="store_true", help="kohya: keep underscores")
    g.add_argument("--no-escape", action="store_true", help="kohya: leave ( ) unescaped")
    g.add_argument("--rating", action="store_true", help="kohya: put the rating tag first")
    g.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="TAG",
        help="kohya: leave this tag out (repeatable)",
    )
    g.add_argument("--json", action="store_true", help="sidecars: print the summary as JSON")
    p.set_defaults(func=run, query_terms_from_options=True)


def run(ctx: Context) -> int:
    from tagd.outputs.effective import iter_files
    from tagd.search.query import QueryError, parse

    words = list(ctx.args.query)
    sidecars = bool(words) and words[0] == "sidecars"
    if sidecars:
        words = words[1:]
    node = None
    if words:
        try:
            node = parse(" ".join(words))
        except QueryError as exc:
            raise UserError(f"bad query:\n{exc.caret()}", 2) from None
    conn = ctx.db()
    try:
        files = iter_files(conn, models=ctx.args.model, node=node, all_scores=ctx.args.all)
        if sidecars:
            return _sidecars(ctx, conn, files)
        from tagd.outputs import export
        from tagd.progress import Progress

        with Progress("export", unit="files") as bar:

            def counted(it: Iterable[FileTagSet]) -> Iterator[FileTagSet]:
                for i, fs in enumerate(it, 1):
                    bar.update(i)
                    yield fs

            writer = export.write_csv if ctx.args.format == "csv" else export.write_jsonl
            n = writer(counted(files), sys.stdout)
    except ValueError as exc:
        raise UserError(str(exc), 2) from None
    print(f"tagd: exported {n} file{'' if n == 1 else 's'} {bar.summary()}", file=sys.stderr)
    return 0


def _sidecars(ctx: Context, conn: Connection, files: Iterable[FileTagSet]) -> int:
    from pathlib import Path

    from tagd.index import db
    from tagd.names import for_humans, is_utf8, json_text, path_b64
    from tagd.outputs.sidecars import KohyaOptions, render, sidecar_path, write_sidecar
    from tagd.progress import Progress

    a = ctx.args
    options = KohyaOptions(
        spaces=not a.underscores, escape=not a.no_escape, rating=a.rating, exclude=a.exclude
    )
    counts = {"written": 0, "unchanged": 0, "kept": 0, "failed": 0}
    kept: list[str] = []
    with Progress(f"sidecars ({a.style})", unit="files") as bar:
        for done, fs in enumerate(files, 1):
            tags = fs.merged()
            for path in fs.paths:
                target = sidecar_path(path, a.style)
                text = render(a.style, path, fs.sha256, tags, options)
                try:
                    with db.write(conn):
                        result = write_sidecar(
                            conn, target, text, overwrite=a.overwrite, image=Path(path)
                        )
                except OSError as exc:
                    where = for_humans(str(target))
                    print(f"tagd: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
                    result = "failed"
                counts[result] += 1
                if result == "kept":
                    kept.append(str(target))
            bar.update(done)
    if a.json:
        report: dict[str, object] = {**counts, "kept_paths": [json_text(p) for p in kept]}
        if not all(is_utf8(p) for p in kept):
            report["kept_paths_b64"] = [path_b64(p) for p in kept]
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    print(
        f"tagd: sidecars: {counts['written']} written, {counts['unchanged']} unchanged, "
        f"{counts['kept']} kept (not written by tagd; --overwrite replaces them), "
        f"{counts['failed']} failed {bar.summary()}",
        file=sys.stderr,
    )
    return 0 if counts["failed"] == 0 else 3
