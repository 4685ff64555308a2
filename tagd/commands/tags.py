"""`tagd tags [PREFIX]`: tags with the number of files each model selected them for."""

from __future__ import annotations

import argparse
import json
import sys

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tags",
        help="list tags by how many files have them",
        description="Print tag counts (files with the tag selected by any model), most common "
        "first. PREFIX may be namespace:prefix, e.g. character: or character:hatsune.",
        epilog="example: tagd tags --top 20 character:",
    )
    p.add_argument("prefix", nargs="?", default="", help="only tags starting with this")
    p.add_argument("--top", type=int, default=None, help="only the N most common")
    p.add_argument("--model", help="count only this model's selections")
    p.add_argument("--format", choices=("tsv", "json"), default="tsv")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.query import NAMESPACES
    from tagd.tagtext import with_underscores

    args = ctx.args
    if args.top is not None and args.top < 1:
        raise UserError("--top takes a number >= 1", 2)
    namespace, prefix = None, args.prefix
    head, sep, rest = prefix.partition(":")
    if sep and head.lower() in NAMESPACES:
        namespace, prefix = head.lower(), rest
    prefix = with_underscores(prefix)
    conn = ctx.db(readonly=True)
    where, params = ["s.selected = 1"], []
    if prefix:
        where.append("t.name >= ? AND t.name < ?")
        params += [prefix, prefix + "\U0010ffff"]
    if namespace:
        where.append("t.namespace = ?")
        params.append(namespace)
    if args.model:
        row = conn.execute("SELECT id FROM models WHERE name = ?", (args.model,)).fetchone()
        if row is None:
            raise UserError(f"no model named {args.model!r} in the index", 2)
        where.append("s.model_id = ?")
        params.append(row[0])
    sql = (
        "SELECT t.namespace, t.name, count(DISTINCT s.file_id) AS n FROM scores s "
        f"JOIN tags t ON t.id = s.tag_id WHERE {' AND '.join(where)} "
        "GROUP BY t.id ORDER BY n DESC, t.namespace, t.name"
    )
    if args.top is not None:
        sql += " LIMIT ?"
        params.append(args.top)
    rows = conn.execute(sql, params).fetchall()
    if args.format == "json":
        json.dump([{"namespace": r[0], "tag": r[1], "files": r[2]} for r in rows], sys.stdout)
        sys.stdout.write("\n")
    else:
        for ns, name, n in rows:
            sys.stdout.write(f"{n}\t{ns}:{name}\n")
    return 0 if rows else 1
