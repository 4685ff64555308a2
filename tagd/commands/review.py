"""`tagd review PATH|SHA256 +tag -tag [--clear tag]`: a person's verdict on a file's tags."""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "review",
        help="accept (+tag), reject (-tag) or clear a file's tags by hand",
        description="Record a human verdict on a file's tags. +TAG makes the tag effective "
        "whatever the models said (accept a suggestion or add a missed tag); -TAG makes it "
        "never effective; --clear TAG hands the decision back to the models. Verdicts are kept "
        "apart from model scores: retag and reindex never undo them. Without changes, prints "
        "the file's verdicts.",
        epilog="example: tagd review ~/gallery/a.jpg +smile -hat --clear character:foo",
    )
    p.add_argument("file", help="image path (as indexed) or sha256 (8+ hex digits)")
    # REMAINDER: '-tag' words must not be read as options; --clear/--by/--format after
    # them are picked out by parse_changes.
    p.add_argument(
        "changes",
        nargs=argparse.REMAINDER,
        metavar="CHANGE",
        help="+TAG to accept or add, -TAG to reject",
    )
    p.add_argument("--clear", action="append", default=[], metavar="TAG", help="drop a verdict")
    p.add_argument("--by", default=None, help="who decided (default: your user name)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def parse_changes(args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """'+tag' / '-tag' words and --clear tags as (tag, verdict or None); options written
    after the changes are set on `args`."""
    out: list[tuple[str, int | None]] = []
    words = list(args.changes)
    while words:
        w = words.pop(0)
        if w in ("--clear", "--by", "--format"):
            if not words:
                raise UserError(f"review: {w} needs a value", 2)
            value = words.pop(0)
            if w == "--clear":
                args.clear.append(value)
            elif w == "--by":
                args.by = value
            elif value in ("text", "json"):
                args.format = value
            else:
                raise UserError("review: --format takes text or json", 2)
        elif w == "--json":
            args.format = "json"
        elif len(w) < 2 or w[0] not in "+-" or w.startswith("--"):
            raise UserError(f"review: {w!r}: write +TAG to accept or add, -TAG to reject", 2)
        else:
            out.append((w[1:], 1 if w[0] == "+" else -1))
    return out + [(t, None) for t in args.clear]


def run(ctx: Context) -> int:
    from tagd.index import reviews as review

    changes = parse_changes(ctx.args)
    conn = ctx.db()
    try:
        file_id, sha = review.resolve_file(conn, ctx.args.file)
        if changes:
            review.apply(conn, file_id, changes, ctx.args.by or _user())
    except review.ReviewError as exc:
        raise UserError(str(exc), 1) from None
    rows = review.verdicts(conn, file_id)
    if ctx.args.format == "json":
        json.dump(
            {
                "sha256": sha,
                "reviews": [
                    {"namespace": v.namespace, "tag": v.name, "verdict": v.verdict, "by": v.by}
                    for v in rows
                ],
            },
            sys.stdout,
        )
        sys.stdout.write("\n")
        return 0
    print(sha)
    for v in rows:
        print(f"  {'+' if v.verdict > 0 else '-'}{v.namespace}:{v.name}  ({v.by})")
    if not rows:
        print("  no verdicts: the models decide")
    return 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "cli"
