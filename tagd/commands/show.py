"""`tagd show PATH`: a file's tags with confidences, per model."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tagd.commands import Context, UserError

NAMESPACE_ORDER = ("rating", "character", "copyright", "artist", "general", "meta")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "show",
        help="show an image's tags",
        description="Print the rating, character and general tags of an image with their "
        "confidences, per model. Stored scores below the threshold are shown with --all.",
        epilog="example: tagd show ~/gallery/img001.jpg",
    )
    p.add_argument("path", help="image path (as under a watch root)")
    p.add_argument("--all", action="store_true", help="also list stored scores below threshold")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def _order(ns: str) -> tuple[int, str]:
    return (NAMESPACE_ORDER.index(ns) if ns in NAMESPACE_ORDER else len(NAMESPACE_ORDER), ns)


def run(ctx: Context) -> int:
    from tagd.index.inventory import file_tags
    from tagd.names import for_humans, json_path

    path = os.path.abspath(ctx.args.path)
    conn = ctx.db(readonly=True)
    info = file_tags(conn, path)
    if info is None:
        from tagd.index.jobs import job_state

        job = job_state(conn, path)
        if job is not None and job[0] == "failed":
            raise UserError(
                f"{path} failed to tag: {job[1] or 'no reason recorded'} "
                f"(after {job[2]} attempt{'s' if job[2] != 1 else ''}; `tagd jobs retry` "
                "queues it again)",
                1,
            )
        if job is not None and job[0] in ("queued", "running"):
            reason = f" (last attempt: {job[1]})" if job[1] else ""
            raise UserError(f"{path} is {job[0]}, not tagged yet{reason}", 1)
        raise UserError(
            f"{for_humans(path)} is not in the index (not scanned yet, not under a watch root, "
            "or moved or deleted since the last scan)",
            1,
        )
    if ctx.args.format == "json":
        json.dump(
            {
                **json_path(info.path),
                "sha256": info.sha256,
                "width": info.width,
                "height": info.height,
                "models": {
                    m: [
                        {"namespace": ns, "tag": n, "score": round(s, 4), "selected": sel}
                        for ns, n, s, sel in rows
                        if sel or ctx.args.all
                    ]
                    for m, rows in info.models.items()
                },
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return 0
    out = [for_humans(info.path), f"  sha256 {info.sha256}  {info.width}x{info.height}"]
    if not info.models:
        out.append("  not tagged yet")
    for model, rows in info.models.items():
        out.append(f"[{model}]")
        shown = [r for r in rows if r[3] or ctx.args.all]
        for ns in sorted({r[0] for r in shown}, key=_order):
            tags = [r for r in shown if r[0] == ns]
            cells = ", ".join(f"{n} {s:.2f}" + ("" if sel else "*") for _, n, s, sel in tags)
            out.append(f"  {ns + ':':<11} {cells}")
        if ctx.args.all:
            out.append("  (* = stored but below the threshold)")
    print("\n".join(out))
    return 0
