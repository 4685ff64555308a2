"""`tagd tags [PREFIX]`: tags with the number of files each model selected them for."""

from __future__ import annotations

import argparse
import json
import sys

from tagd.commands import Context, UserError
from tagd.index import inventory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tags",
        help="list tags by how many files have them; import Danbooru tag rules",
        description="Print tag counts (files with the tag selected by any model), most common "
        "first. PREFIX may be namespace:prefix, e.g. character: or character:hatsune. "
        "`tagd tags import-rules FILE` imports Danbooru's tag_aliases or tag_implications "
        "export (JSON or CSV; active rules only); `tagd reindex` then applies them.",
        epilog="examples:\n  tagd tags --top 20 character:\n"
        "  tagd tags import-rules tag_implications.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prefix", nargs="?", default="", help="only tags starting with this")
    p.add_argument("file", nargs="?", help=argparse.SUPPRESS)
    p.add_argument(
        "--kind",
        choices=("aliases", "implications"),
        help="with import-rules: what FILE holds (default: from its name)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="with import-rules: drop rules of this kind imported before",
    )
    p.add_argument("--top", type=int, default=None, help="only the N most common")
    p.add_argument("--model", help="count only this model's selections")
    p.add_argument("--format", choices=("tsv", "json"), default="tsv")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.search.query import NAMESPACES
    from tagd.tagtext import with_underscores

    args = ctx.args
    if args.prefix == "import-rules":
        return import_rules(ctx)
    if args.file is not None:
        raise UserError(
            f"unexpected argument {args.file!r}; did you mean `tagd tags import-rules`?", 2
        )
    if args.top is not None and args.top < 1:
        raise UserError("--top takes a number >= 1", 2)
    namespace, prefix = None, args.prefix
    head, sep, rest = prefix.partition(":")
    if sep and head.lower() in NAMESPACES:
        namespace, prefix = head.lower(), rest
    prefix = with_underscores(prefix)
    conn = ctx.db(readonly=True)
    model = None
    if args.model:
        model = inventory.require_model_id(conn, args.model)
    rows = inventory.tag_counts(conn, prefix=prefix, namespace=namespace, model=model, top=args.top)
    if args.format == "json":
        json.dump(
            [{"namespace": r.namespace, "tag": r.name, "files": r.files} for r in rows],
            sys.stdout,
        )
        sys.stdout.write("\n")
    else:
        for r in rows:
            sys.stdout.write(f"{r.files}\t{r.namespace}:{r.name}\n")
    if not rows:
        shown = f"{namespace}:{prefix}" if namespace else prefix
        what = f"starts with '{shown}'" if shown else "has been selected for any file"
        if namespace and not prefix:
            what = f"in namespace '{namespace}' has been selected for any file"
        print(f"tagd: no tag {what}", file=sys.stderr)
    return 0 if rows else 1


def import_rules(ctx: Context) -> int:
    """Store a Danbooru aliases/implications export in the index (see tagd.tagrules)."""
    from pathlib import Path

    from tagd.tagging import tagrules

    if not ctx.args.file:
        raise UserError("tagd tags import-rules: give the file, e.g. tag_implications.json", 2)
    path = Path(ctx.args.file)
    kind = tagrules.KINDS[ctx.args.kind] if ctx.args.kind else None
    try:
        parsed = tagrules.parse(path, kind)
    except tagrules.RulesFileError as exc:
        raise UserError(str(exc), 2) from None
    conn = ctx.db()
    n = tagrules.store(conn, parsed, path.name, replace_all=ctx.args.replace)
    total = tagrules.counts(conn)
    print(
        f"imported {n:,} {parsed.kind} rules from {path.name} ({parsed.inactive:,} inactive "
        f"or empty skipped); the index holds {total.get('alias', 0):,} aliases and "
        f"{total.get('implication', 0):,} implications. Run `tagd reindex` to apply them."
    )
    return 0
