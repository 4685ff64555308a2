"""The subcommands. Each module has `register(subparsers)` and sets `func(ctx) -> exit code`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tagd.config import Config
    from tagd.index.db import Connection

COMMAND_MODULES = (
    "scan",
    "search",
    "show",
    "hydrus",
    "export",
    "tag",
    "eval",
    "completion",
    "run",
    "status",
    "jobs",
    "pause",
    "models",
    "retag",
    "reindex",
    "similar",
    "dupes",
    "tags",
    "stats",
    "init",
    "config",
    "check",
    "review",
    "serve",
)


class UserError(Exception):
    """An error the user can act on: printed as one line, no traceback."""

    def __init__(self, message: str, exit_code: int = 3) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Context:
    """What every command needs, loaded on first use: the config and a database connection."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._config: Config | None = None
        self._conn: Connection | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            from tagd.config import ConfigError, load

            try:
                self._config = load(self.args.config)
            except ConfigError as exc:
                raise UserError(str(exc), exit_code=2) from None
        return self._config

    def db(self, *, readonly: bool = False) -> Connection:
        if self._conn is None:
            from tagd.index.db import DatabaseError, SQLiteError, connect

            try:
                self._conn = connect(self.config.database, readonly=readonly)
            except (DatabaseError, SQLiteError) as exc:
                where = str(self.config.database)
                raise UserError(
                    str(exc) if where in str(exc) else f"database {where}: {exc}"
                ) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
