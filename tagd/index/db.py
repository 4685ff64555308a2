"""SQLite access: connection setup, numbered migrations and short write transactions.

Every process (daemon, CLI) opens its own connection. WAL lets readers run while the daemon
writes; writers take the lock up front with BEGIN IMMEDIATE so a read-then-write transaction
never fails with "database is locked" despite the busy timeout.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from typing import TypeAlias

from tagd.names import text_for_db

BUSY_TIMEOUT_S = 30.0
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# tagd.names.from_db as a C-level callable: paths stored as raw bytes (names that are not
# UTF-8) read back as the surrogateescape strings the filesystem gave, at C speed.
TEXT_FACTORY = functools.partial(str, encoding="utf-8", errors="surrogateescape")


# Names the layers above use instead of importing sqlite3: commands hold no SQL (issue #13).
Connection: TypeAlias = sqlite3.Connection
SQLiteError = sqlite3.Error


class DatabaseError(Exception):
    """The database cannot be opened or is newer than this tagd."""


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open `path` with tagd's pragmas and bring the schema up to date (unless read-only)."""
    path = Path(path)
    if readonly:
        if not path.exists():
            raise DatabaseError(f"database {path} does not exist yet: run `tagd scan` first")
        uri = readonly_uri(path)
        conn = sqlite3.connect(
            uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise DatabaseError(f"cannot open database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    conn.text_factory = TEXT_FACTORY
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        if not readonly:
            _enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            migrate(conn)
        else:
            check_version(conn)
    except sqlite3.DatabaseError as exc:
        # "file is not a database", a full disk during a migration: one line naming the file.
        from tagd.index.dberrors import describe

        conn.close()
        raise DatabaseError(describe(exc, path)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def connect_bare_readonly(path: str | Path) -> sqlite3.Connection:
    """A read-only connection without tagd's pragmas or version check, for decode workers:
    cheap to open in every worker process, and it only asks which models tagged a file (the
    parent already opened, migrated and checked the database)."""
    return sqlite3.connect(readonly_uri(path), uri=True, timeout=BUSY_TIMEOUT_S)


def readonly_uri(path: str | Path) -> str:
    """A read-only SQLite URI for `path`; `?`, `#` and `%` in a folder name would otherwise
    end the file name or start an escape."""
    return f"file:{urllib.parse.quote(str(path))}?mode=ro"


def database_file(conn: sqlite3.Connection) -> str | None:
    """The main database's file, or None for an in-memory database."""
    for row in conn.execute("PRAGMA database_list"):
        if row[1] == "main":
            return row[2] or None
    return None


def checkpoint(conn: sqlite3.Connection, *, truncate: bool) -> None:
    """Fold the WAL back into the database; `truncate` also shrinks the WAL file to zero,
    which waits for readers, so it is kept for when the WAL has grown large."""
    conn.execute(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})").fetchall()


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL once per database file. The switch needs a moment of exclusive access
    and does not wait on the busy handler, so two processes creating the database together
    (daemon and CLI) retry briefly instead of failing with "database is locked"."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One short IMMEDIATE transaction: committed on success, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        rollback(conn)
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open. SQLite rolls back by itself on a full disk or
    an I/O error; a second ROLLBACK would then replace the real error with "cannot rollback -
    no transaction is active"."""
    if not conn.in_transaction:
        return
    with suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def migrations() -> list[tuple[int, str, str]]:
    """The packaged migrations as (version, name, sql), in order."""
    found = []
    for entry in resources.files("tagd.index.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    return found


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def check_version(conn: sqlite3.Connection) -> None:
    latest = migrations()[-1][0]
    current = schema_version(conn)
    if current > latest:
        raise DatabaseError(
            f"database schema v{current} is newer than this tagd understands (v{latest}): "
            "upgrade tagd"
        )


def applied(conn: sqlite3.Connection) -> set[int]:
    """Migration versions recorded in this database (each migration records itself)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'state'").fetchone() is None:
        return set()
    return {
        int(key.split(".", 1)[1])
        for (key,) in conn.execute("SELECT key FROM state WHERE key GLOB 'migration.[0-9]*'")
    }


def migrate(conn: sqlite3.Connection) -> int:
    """Apply every migration not yet recorded, in order, each in its own transaction.

    Recorded per version rather than by `user_version` alone, so a migration numbered below
    one already applied (branches landing out of order) is still applied.
    """
    check_version(conn)
    for version, name, sql in migrations():
        if version in applied(conn):
            continue
        with write(conn):
            if version in applied(conn):
                continue  # another process applied it while this one waited for the lock
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {max(version, schema_version(conn))}")
            conn.execute(
                "INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)",
                (f"migration.{version:04d}", f"{name} applied {time.time():.0f}"),
            )
    return schema_version(conn)


def _split_sql(sql: str) -> list[str]:
    """Split a migration script into statements (sqlite3.executescript would COMMIT)."""
    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise DatabaseError(f"incomplete SQL statement in migration: {buf.strip()[:80]}")
    return statements


def get_state(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
    return default if row is None else row[0]


def delete_state(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("DELETE FROM state WHERE key = ?", (key,))


def set_state(conn: sqlite3.Connection, key: str, value: str | None) -> None:
    """Values may quote file names (the last error), so raw bytes are escaped first."""
    if value is not None:
        value = text_for_db(value)
    conn.execute("INSERT OR REPLACE INTO state(key, value) VALUES (?, ?)", (key, value))
