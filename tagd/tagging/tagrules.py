"""Danbooru aliases and implications imported from the files users download, stored in the
index and merged with the config's own tag rules.

Danbooru's public exports (`/tag_aliases.json`, `/tag_implications.json`, or their CSV dumps)
list `antecedent_name → consequent_name` with a `status`; only active rules are taken, since
deleted and pending ones are not Danbooru's current vocabulary.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from tagd.config import TagRules
from tagd.index import tag_rules

KINDS = {"aliases": "alias", "implications": "implication"}
ACTIVE = {"active", "approved", ""}


class RulesFileError(Exception):
    """The rules file cannot be read; the message names the file and the fix."""


@dataclass
class Parsed:
    kind: str
    pairs: list[tuple[str, str]]
    inactive: int = 0


def guess_kind(path: Path) -> str | None:
    name = path.name.lower()
    if "alias" in name:
        return "alias"
    if "implication" in name:
        return "implication"
    return None


def _rows(path: Path) -> list[dict[str, object]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RulesFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise RulesFileError(f"{path}: not UTF-8 text; expected Danbooru's JSON or CSV") from None
    stripped = text.lstrip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RulesFileError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise RulesFileError(f"{path}: expected a JSON list of rule objects")
        return data
    reader = csv.DictReader(text.splitlines())
    return list(reader)


def parse(path: Path, kind: str | None = None) -> Parsed:
    """Active (antecedent, consequent) pairs from a Danbooru aliases or implications export."""
    kind = kind or guess_kind(path)
    if kind is None:
        raise RulesFileError(
            f"{path}: cannot tell aliases from implications by the file name; "
            "add --kind aliases or --kind implications"
        )
    rows = _rows(path)
    if rows and not {"antecedent_name", "consequent_name"} <= set(rows[0]):
        raise RulesFileError(
            f"{path}: expected antecedent_name and consequent_name fields (Danbooru's "
            f"tag_{'aliases' if kind == 'alias' else 'implications'} export), found "
            f"{', '.join(map(str, rows[0])) or 'nothing'}"
        )
    out = Parsed(kind, [])
    for row in rows:
        status = str(row.get("status") or "").strip().lower()
        a = str(row.get("antecedent_name") or "").strip()
        c = str(row.get("consequent_name") or "").strip()
        if status not in ACTIVE or not a or not c or a == c:
            out.inactive += 1
            continue
        out.pairs.append((a, c))
    return out


def store(conn: sqlite3.Connection, parsed: Parsed, source: str, *, replace_all: bool) -> int:
    """Save the rules; with `replace_all`, earlier imports of this kind are dropped first."""
    tag_rules.save(conn, parsed.kind, parsed.pairs, source, replace_all=replace_all)
    return len(parsed.pairs)


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return tag_rules.counts(conn)


def effective(conn: sqlite3.Connection, rules: TagRules) -> TagRules:
    """The config's rules plus the imported ones; the config wins where both set an alias,
    and implications add up."""
    rows = tag_rules.all_rules(conn)
    if not rows:
        return rules
    aliases: dict[str, str] = {}
    implications: dict[str, tuple[str, ...]] = {}
    for kind, a, c in rows:
        if kind == "alias":
            aliases[a] = c
        else:
            implications[a] = (*implications.get(a, ()), c)
    for a, implied in rules.implications.items():
        mine = (implied,) if isinstance(implied, str) else tuple(implied)
        implications[a] = tuple(dict.fromkeys((*implications.get(a, ()), *mine)))
    merged: dict[str, str | tuple[str, ...]] = dict(implications)
    return replace(rules, aliases={**aliases, **rules.aliases}, implications=merged)
