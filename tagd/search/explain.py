"""`tagd search --explain`: the parsed tree in words, with the thresholds each tag uses."""

from __future__ import annotations

import json
import sqlite3

from tagd.index import reviews as review
from tagd.search.query import (
    And,
    Flag,
    Model,
    Node,
    Not,
    Or,
    Range,
    Rating,
    Score,
    Similar,
    Tag,
)


def explain(
    node: Node,
    conn: sqlite3.Connection | None = None,
    indent: int = 0,
    notes: dict[Tag, str] | None = None,
    verdicts: bool | None = None,
) -> str:
    """The parsed tree, one node a line, with the thresholds each tag term uses.

    `notes` marks tag terms the index does not know (tagd.suggest), so the reader sees
    which branch can never match. Where people have reviewed tags (`verdicts`, looked up
    when None), each term says how their verdicts change it.
    """
    pad = "  " * indent
    notes = notes or {}
    if verdicts is None:
        verdicts = conn is not None and review.in_use(conn)
    if isinstance(node, And | Or):
        head = "AND" if isinstance(node, And) else "OR"
        lines = (explain(t, conn, indent + 1, notes, verdicts) for t in node.terms)
        return "\n".join([f"{pad}{head}", *lines])
    if isinstance(node, Not):
        return f"{pad}NOT\n{explain(node.term, conn, indent + 1, notes, verdicts)}"
    if isinstance(node, Tag):
        ns = node.namespace or "any namespace"
        kind = "pattern" if node.wildcard else "tag"
        line = f"{pad}{kind} {node.name!r} ({ns}), selected by {_thresholds(node, conn)}"
        if verdicts:
            line += "; a person's verdict overrides: accepted matches, rejected does not"
        return line + (f"  [UNKNOWN: {notes[node]}]" if node in notes else "")
    if isinstance(node, Score):
        mark = f"  [UNKNOWN: {notes[node.tag]}]" if node.tag in notes else ""
        judged = "; a tag a person accepted counts 1.0, one rejected 0" if verdicts else ""
        return (
            f"{pad}confidence of {node.tag.name!r} ({node.tag.namespace or 'any'}) in "
            f"{_fmt_range(node.range)} (unstored scores below the floor count as 0)"
            f"{judged}{mark}"
        )
    if isinstance(node, Rating):
        given = "; a rating a person gave replaces the models'" if verdicts else ""
        return f"{pad}rating in {', '.join(node.names)} (each model's top rating){given}"
    if isinstance(node, Model):
        return f"{pad}model {node.name!r}: every term uses only this model's predictions"
    if isinstance(node, Flag):
        what = {
            "reviewed": "files with any human verdict",
            "source:human": "files with a tag a person accepted or added",
        }.get(node.name)
        return f"{pad}{node.name}" + (f" ({what})" if what else "")
    if isinstance(node, Similar):
        return f"{pad}similar to {node.ref!r} (cosine >= {node.min_sim})"
    shown = _fmt_range(node.range) if node.range else node.text
    return f"{pad}{node.key} {shown}"


def _fmt_range(r: Range) -> str:
    lo = "-inf" if r.lo is None else f"{r.lo:g}"
    hi = "inf" if r.hi is None else f"{r.hi:g}"
    return f"{'[' if r.lo_incl else '('}{lo}, {hi}{']' if r.hi_incl else ')'}"


def _thresholds(tag: Tag, conn: sqlite3.Connection | None) -> str:
    if conn is None:
        return "each model's thresholds"
    parts = []
    for name, settings in conn.execute("SELECT name, settings FROM models ORDER BY name"):
        try:
            th = json.loads(settings or "{}").get("thresholds", {})
        except ValueError:
            th = {}
        ns = tag.namespace or "general"
        parts.append(f"{name} {ns} {th.get(ns, 'default')}")
    return "; ".join(parts) or "each model's thresholds (no models yet)"
