"""The index is the only code that speaks SQL (issue #13): one owner per table.

Checked on the source's syntax tree, not by grep, so a statement split over lines, a cursor
named anything, or `sqlite3.connect` reached through an alias is still found, while the word
"execute" in a message or docstring is not.
"""

from __future__ import annotations

import ast
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
