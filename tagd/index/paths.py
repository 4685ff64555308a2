"""The files-and-paths family (`files`, `paths`): a file's row by content, the paths that
point at it, their state changes (watcher, scanner, pipeline), moves, and which files are
present. Callers own the transaction.

Free of numpy, so `tagd search` (which reaches the scanner's folder ranges) starts without it."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Sequence

from tagd.names import AS_TEXT, to_db


def mark_missing(conn: sqlite3.Connection, path: str) -> None:
    """The file at `path` is gone; its tags stay with the content for when it comes back."""
    conn.execute(f"UPDATE paths SET missing = 1 WHERE path = {AS_TEXT}", (to_db(path),))


def mark_missing_under(
    conn: sqlite3.Connection, low: str, high: str, *, seen_before: float | None = None
) -> int:
    """Paths in [low, high) (a folder's range) are gone; with `seen_before`, only those a
    walk that started then did not see again. Returns how many."""
    seen = "" if seen_before is None else " AND (last_seen IS NULL OR last_seen < ?)"
    params: list[object] = [to_db(low), to_db(high)]
    if seen_before is not None:
        params.append(seen_before)
    return conn.execute(
        f"""UPDATE paths SET missing = 1
            WHERE path >= {AS_TEXT} AND path < {AS_TEXT} AND missing = 0{seen}""",
        params,
    ).rowcount


def mark_seen(conn: sqlite3.Connection, path: str, at: float) -> None:
    """A watcher event showed the file at `path` is here (again), at `at`."""
    conn.execute(
        f"UPDATE paths SET missing = 0, last_seen = ? WHERE path = {AS_TEXT}", (at, to_db(path))
    )


def mark_seen_many(conn: sqlite3.Connection, paths: Iterable[str], at: float) -> None:
    """A walk that started at `at` found these paths: later mark_missing_under spares them."""
    conn.executemany(
        f"UPDATE paths SET last_seen = ?, missing = 0 WHERE path = {AS_TEXT}",
        [(at, to_db(p)) for p in paths],
    )


def move(conn: sqlite3.Connection, src: str, dest: str, at: float) -> None:
    """A file renamed inside the roots keeps its row (and so its tags) under the new name;
    a row already at `dest` is replaced."""
    conn.execute(
        f"""UPDATE OR REPLACE paths SET path = {AS_TEXT}, missing = 0, last_seen = ?
           WHERE path = {AS_TEXT}""",
        (to_db(dest), at, to_db(src)),
    )


def below_folder_sql(low: str) -> tuple[str, int]:
    """SQL for the part of `path` below the folder whose range starts at `low`, and its
    parameter: cut in bytes, as raw names are not UTF-8 characters."""
    return "CAST(substr(CAST(path AS BLOB), ?) AS TEXT)", len(os.fsencode(low)) + 1


def move_under(conn: sqlite3.Connection, low: str, high: str, dest: str, at: float) -> None:
    """A folder (paths in [low, high)) renamed to `dest`: every row below it moves along."""
    tail, cut = below_folder_sql(low)
    conn.execute(
        f"""UPDATE OR REPLACE paths SET path = {AS_TEXT} || {tail}, missing = 0,
               last_seen = ? WHERE path >= {AS_TEXT} AND path < {AS_TEXT}""",
        (to_db(dest.rstrip("/") + "/"), cut, at, to_db(low), to_db(high)),
    )


def present_file_count(conn: sqlite3.Connection) -> int:
    """Files with at least one path that is not missing."""
    return int(
        conn.execute(
            "SELECT count(*) FROM files f WHERE EXISTS "
            "(SELECT 1 FROM paths p WHERE p.file_id = f.id AND p.missing = 0)"
        ).fetchone()[0]
    )


def present_files(
    conn: sqlite3.Connection, where: str = "1", params: Sequence[object] = ()
) -> list[tuple[int, str]]:
    """(id, sha256) of files with a present path that match the compiled query `where` (over
    `files f`), in id order."""
    return [
        (int(fid), str(sha))
        for fid, sha in conn.execute(
            "SELECT f.id, f.sha256 FROM files f WHERE EXISTS "
            "(SELECT 1 FROM paths p WHERE p.file_id = f.id AND p.missing = 0) "
            f"AND ({where}) ORDER BY f.id",
            list(params),
        )
    ]


def present_paths_of(conn: sqlite3.Connection, file_ids: Iterable[int]) -> dict[int, list[str]]:
    """File id → its present paths, sorted."""
    ids = ",".join(str(int(f)) for f in file_ids)
    out: dict[int, list[str]] = {}
    for fid, path in conn.execute(
        f"SELECT file_id, path FROM paths WHERE missing = 0 AND file_id IN ({ids}) ORDER BY path"
    ):
        out.setdefault(int(fid), []).append(str(path))
    return out


def file_id_for_sha(conn: sqlite3.Connection, sha256: str) -> int | None:
    """The id of the file with this content, None when the index has never seen it."""
    row = conn.execute("SELECT id FROM files WHERE sha256 = ?", (sha256,)).fetchone()
    return None if row is None else int(row[0])


def upsert_file(
    conn: sqlite3.Connection,
    sha256: str,
    size: int,
    width: int | None,
    height: int | None,
    fmt: str | None,
) -> int:
    row = conn.execute(
        """INSERT INTO files(sha256, size, width, height, format, first_seen)
           VALUES (?, ?, ?, ?, ?, ?)
           ON CONFLICT(sha256) DO UPDATE SET
               width = coalesce(excluded.width, width),
               height = coalesce(excluded.height, height),
               format = coalesce(excluded.format, format)
           RETURNING id""",
        (sha256, size, width, height, fmt, time.time()),
    ).fetchone()
    return int(row[0])


def upsert_path(
    conn: sqlite3.Connection, path: str, file_id: int | None, size: int, mtime_ns: int
) -> None:
    conn.execute(
        f"""INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen)
           VALUES ({AS_TEXT}, ?, ?, ?, 0, ?)
           ON CONFLICT(path) DO UPDATE SET
               file_id = excluded.file_id, size = excluded.size,
               mtime_ns = excluded.mtime_ns, missing = 0, last_seen = excluded.last_seen""",
        (to_db(path), file_id, size, mtime_ns, time.time()),
    )


def set_media_info(
    conn: sqlite3.Connection,
    file_id: int,
    duration: float | None,
    frames: int | None,
    fps: float | None,
) -> None:
    """A video's or animation's length (migration 0012); stills keep NULLs."""
    conn.execute(
        "UPDATE files SET duration = ?, frames = ?, fps = ? WHERE id = ?",
        (duration, frames, fps, file_id),
    )
