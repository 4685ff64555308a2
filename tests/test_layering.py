"""The index is the only code that speaks SQL (issue #13): one owner per table.

Checked on the source's syntax tree, not by grep, so a statement split over lines, a cursor
named anything, or `sqlite3.connect` reached through an alias is still found, while the word
"execute" in a message or docstring is not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tagd"
SQL_METHODS = frozenset({"execute", "executemany", "executescript"})
# tagd/index owns the tables. tagd/search is the one stated exception: it compiles a user's
# query into SQL (compile, plan, engine) and builds its caches (rankcache, bitmaps, similar,
# vectors) from statements shaped by that query, so its SQL cannot be a fixed set of typed
# functions below it; it still only reads, and writes go through tagd/index.
SQL_OWNERS = ("index", "search")


def _modules(under: Path) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if "__pycache__" not in p.parts)


def _sqlite_aliases(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names bound to the sqlite3 module and to sqlite3.connect in this module."""
    modules, connects = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sqlite3":
                    modules.add(alias.asname or "sqlite3")
        elif isinstance(node, ast.ImportFrom) and node.module == "sqlite3":
            for alias in node.names:
                if alias.name == "connect":
                    connects.add(alias.asname or "connect")
    return modules, connects


def sql_calls(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Each SQL call in `path` as 'file:line call', the file named relative to `root`."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    modules, connects = _sqlite_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = None
        if isinstance(fn, ast.Attribute) and fn.attr in SQL_METHODS:
            name = f".{fn.attr}("
        elif (
            isinstance(fn, ast.Attribute)
            and fn.attr == "connect"
            and isinstance(fn.value, ast.Name)
            and fn.value.id in modules
        ) or (isinstance(fn, ast.Name) and fn.id in connects):
            name = "sqlite3.connect("
        if name:
            found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def imports_sqlite3(path: Path) -> bool:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "sqlite3" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "sqlite3":
            return True
    return False


def test_only_index_and_search_speak_sql() -> None:
    """Outside tagd/index and tagd/search no module calls .execute(, .executemany(,
    .executescript( or sqlite3.connect(: each table has one owner module in tagd/index (table
    → module in docs/design.md). tagd/search is exempt because it compiles queries to SQL."""
    outside = [p for p in _modules(PACKAGE) if p.relative_to(PACKAGE).parts[0] not in SQL_OWNERS]
    assert len(outside) > 50, "the walk found too few modules to mean anything"
    found = [call for p in outside for call in sql_calls(p)]
    assert found == [], "SQL outside tagd/index: move it into an index module\n" + "\n".join(found)


def test_commands_do_not_import_sqlite3() -> None:
    """Commands format and parse; the connection type and errors come from tagd.index.db."""
    commands = _modules(PACKAGE / "commands")
    assert len(commands) > 10
    assert [str(p.relative_to(PACKAGE.parent)) for p in commands if imports_sqlite3(p)] == []


# One owner per table (docs/design.md, "Table owners"): the only module that writes it.
OWNERS = {
    "files": "index/paths.py",
    "paths": "index/paths.py",
    "models": "index/models.py",
    "tags": "index/models.py",
    "model_tags": "index/models.py",
    "model_heads": "index/models.py",
    "scores": "index/scores.py",
    "taggings": "index/scores.py",
    "embeddings": "index/scores.py",
    "score_changes": "index/scores.py",
    "jobs": "index/jobs.py",
    "state": "index/db.py",
    "reviews": "index/reviews.py",
    "tag_rules": "index/tag_rules.py",
    "hydrus_pushed": "index/hydrus_state.py",
    "sidecars": "index/sidecars.py",
}
WRITE = re.compile(
    r"(?:INSERT(?:\s+OR\s+\w+)?\s+INTO|(?<!DO )UPDATE(?:\s+OR\s+\w+)?|DELETE\s+FROM)\s+(\w+)",
)


def written_tables(path: Path) -> set[str]:
    """Tables that the SQL text in `path` (string literals, f-strings' literal parts) writes.
    Keywords in capitals, as tagd writes SQL, so prose ("update a model") is not SQL."""
    texts = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.JoinedStr):
            texts.append(
                "".join(
                    v.value
                    for v in node.values
                    if isinstance(v, ast.Constant) and isinstance(v.value, str)
                )
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
    return {m.group(1) for text in texts for m in WRITE.finditer(text)}


def test_each_table_has_one_writer() -> None:
    """A table's writes live in one index module, so its schema changes touch one place."""
    writers: dict[str, set[str]] = {}
    for p in _modules(PACKAGE):
        for table in written_tables(p):
            writers.setdefault(table, set()).add(str(p.relative_to(PACKAGE)))
    assert writers == {t: {m} for t, m in OWNERS.items()}


def test_writer_scan_reads_sql_text(tmp_path: Path) -> None:
    """The scan behind the owner check sees f-strings and OR clauses, not upserts or prose."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        'a = f"UPDATE OR REPLACE paths SET x = {y}"\n'
        '"""INSERT INTO t(a) VALUES (1) ON CONFLICT(a) DO UPDATE SET a = 2"""\n'
        "b = 'DELETE FROM jobs WHERE 1'\n"
        "'''Create or update a model row.'''\n"
        "c = 'SELECT * FROM files'  # a read\n"
    )
    assert written_tables(probe) == {"paths", "t", "jobs"}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("conn.execute('SELECT 1')", [".execute("]),
        ("c.cursor().executemany(\n  'INSERT', rows)", [".executemany("]),
        ("self._marks.executescript(s)", [".executescript("]),
        ("import sqlite3\nsqlite3.connect(':memory:')", ["sqlite3.connect("]),
        ("import sqlite3 as s\ns.connect('x')", ["sqlite3.connect("]),
        ("from sqlite3 import connect as c\nc('x')", ["sqlite3.connect("]),
        ("'''run execute( here'''\nlog('cannot execute')", []),
        ("import socket\nsocket.connect(1)", []),
    ],
)
def test_checker_finds_sql_calls(tmp_path: Path, source: str, expected: list[str]) -> None:
    """The checker itself: it must see each form of call, and nothing that only mentions it."""
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert [c.split(" ", 1)[1] for c in sql_calls(probe, tmp_path)] == expected
