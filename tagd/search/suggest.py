"""Tags a query names that the index does not know, with a "did you mean" for each.

A misspelled tag otherwise just matches nothing, which reads as "tagd is broken". The
index's `tags` table holds every label of every registered model (not only tags some file
has), so a name missing there can never match, whatever gets tagged later.
"""

from __future__ import annotations

import difflib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

from tagd.search.query import NAMESPACES, RATINGS, Node, Score, Tag, walk

_CUTOFF = 0.6


@dataclass(frozen=True)
class Unknown:
    """A tag term that cannot match, and the one-line message that says why."""

    term: Tag
    message: str


def tag_terms(node: Node) -> Iterator[Tag]:
    """Every tag a query names, including those inside confidence filters."""
    for n in walk(node):
        if isinstance(n, Score):
            yield n.tag
        elif isinstance(n, Tag):
            yield n


def unknown_tags(conn: sqlite3.Connection, node: Node) -> list[Unknown]:
    """The query's tag terms that no model in the index has, in query order."""
    terms = list(dict.fromkeys(tag_terms(node)))
    if not terms:
        return []
    if conn.execute("SELECT 1 FROM tags LIMIT 1").fetchone() is None:
        return [Unknown(terms[0], "the index has no tags yet: run `tagd scan` first")]
    out = []
    for term in terms:
        message = _check(conn, term)
        if message is not None:
            out.append(Unknown(term, message))
    return out


def _check(conn: sqlite3.Connection, term: Tag) -> str | None:
    shown = f"{term.namespace}:{term.name}" if term.namespace else term.name
    if term.wildcard:
        return None if _glob_matches(conn, term) else f"no tag matches '{shown}' in the index"
    if _exists(conn, term.name, term.namespace):
        return None
    if term.namespace == "rating":
        known = [r[0] for r in conn.execute("SELECT name FROM tags WHERE namespace = 'rating'")]
        ordered = [r for r in RATINGS if r in known] + sorted(set(known) - set(RATINGS))
        return f"no rating '{term.name}' in the index; ratings are {', '.join(ordered or RATINGS)}"
    guess = _suggest(conn, term)
    hint = f"; did you mean '{guess}'?" if guess else ""
    return f"no tag '{shown}' in the index{hint}"


def _exists(conn: sqlite3.Connection, name: str, namespace: str | None) -> bool:
    sql, params = "SELECT 1 FROM tags WHERE name = ?", [name]
    if namespace is not None:
        sql += " AND namespace = ?"
        params.append(namespace)
    return conn.execute(sql + " LIMIT 1", params).fetchone() is not None


def _glob_matches(conn: sqlite3.Connection, term: Tag) -> bool:
    glob = "".join(f"[{c}]" if c in "[?" else c for c in term.name)
    sql, params = "SELECT 1 FROM tags WHERE name GLOB ?", [glob]
    if term.namespace is not None:
        sql += " AND namespace = ?"
        params.append(term.namespace)
    return conn.execute(sql + " LIMIT 1", params).fetchone() is not None


def _suggest(conn: sqlite3.Connection, term: Tag) -> str | None:
    """The closest known spelling, written as the user would type it."""
    if term.namespace is None and ":" in term.name:
        head, _, rest = term.name.partition(":")
        ns = difflib.get_close_matches(head, sorted(NAMESPACES), n=1, cutoff=0.75)
        if ns and rest:
            fixed = Tag(rest, ns[0], term.column)
            if _exists(conn, rest, ns[0]):
                return f"{ns[0]}:{rest}"
            return _suggest(conn, fixed)
    rows = conn.execute("SELECT namespace, name FROM tags").fetchall()
    names = {name for ns, name in rows if term.namespace is None or ns == term.namespace}
    best = difflib.get_close_matches(term.name, sorted(names), n=1, cutoff=_CUTOFF)
    if best:
        return f"{term.namespace}:{best[0]}" if term.namespace else best[0]
    if term.namespace is not None and _exists(conn, term.name, None):
        ns = conn.execute("SELECT namespace FROM tags WHERE name = ?", (term.name,)).fetchone()[0]
        return f"{ns}:{term.name}"
    return None


def tag_names(conn: sqlite3.Connection, prefix: str, limit: int) -> list[str]:
    """Tag names starting with `prefix` (after an optional `namespace:`), most used first,
    for shell completion."""
    head, sep, rest = prefix.partition(":")
    namespace = head.lower() if sep and head.lower() in NAMESPACES else None
    stem = rest if namespace else prefix
    sql = "SELECT namespace, name FROM tags WHERE name >= ? AND name < ?"
    params: list[object] = [stem, stem + "\U0010ffff"]
    if namespace:
        sql += " AND namespace = ?"
        params.append(namespace)
    sql += (
        " ORDER BY (SELECT count(*) FROM scores s WHERE s.tag_id = tags.id AND s.selected = 1)"
        " DESC, name LIMIT ?"
    )
    params.append(limit)
    rows = conn.execute(sql, params).fetchall()
    return [f"{ns}:{name}" if namespace else str(name) for ns, name in rows]
