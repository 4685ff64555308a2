"""`tagd similar` answered by the running daemon, over a socket beside the database.

A `tagd similar` process spends most of its time before its query: the interpreter, numpy
and usearch imports, and usearch opening its memory-mapped view, which walks the whole index
(~80 ms at a million files). The daemon keeps the view open, so the command asks it first
and only falls back to answering itself when nobody listens, the daemon cannot answer
(no usable index, another database, an unknown model: the command's own path gives the
message), or anything goes wrong. Answers are the same function over the same files, so
either way the output is the same.

The socket (`<db>.query.sock`) gets the database folder's file mode, so whoever may write
the folder may ask; it answers one question per connection and only `similar`, which reads
nothing but the database and the caches beside it. This module imports only the standard
library at the top: the client side runs in the command before numpy is imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "TAGD_DAEMON_QUERIES"  # off: the command always answers itself
TIMEOUT_S = 2.0  # then the command answers itself: a busy daemon must not make it wait
MAX_REQUEST = 64 * 1024


def socket_path(database: str | Path) -> Path:
    return Path(f"{database}.query.sock")


def _same_db(database: str | Path) -> str:
    return os.path.realpath(database)


def ask(database: str | Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when the command should answer itself."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    path = socket_path(database)
    if not path.exists():
        return None
    body = json.dumps({**request, "db": _same_db(database)}).encode() + b"\n"
    chunks = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(TIMEOUT_S)
            s.connect(str(path))
            s.sendall(body)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        reply = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return None
    if not isinstance(reply, dict):
        return None
    if isinstance(reply.get("hits"), list) or isinstance(reply.get("error"), str):
        return reply
    return None  # {'fallback': why}, or nothing the command can use


def answer(database: str | Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request: {'hits': [[path, sha256, file id, cosine], ...]}, {'error', 'rc'}, or
    {'fallback': why} for the command to answer itself."""
    from tagd.index import db
    from tagd.index.inventory import UnknownModel
    from tagd.search import similar

    if request.get("op") != "similar":
        return {"fallback": "unknown op"}
    if request.get("db") != _same_db(database):
        return {"fallback": "another database"}
    try:
        ref = str(request["ref"])
        model = None if request.get("model") is None else str(request["model"])
        limit = int(request["limit"])
        min_sim = None if request.get("min_sim") is None else float(request["min_sim"])
    except (KeyError, TypeError, ValueError):
        return {"fallback": "malformed request"}
    conn = db.connect(database, readonly=True)
    try:
        try:
            file_id = similar.resolve_ref(conn, ref)
            found = similar.through_index(
                conn, database, model, file_id, limit=limit * 2, min_sim=min_sim
            )
        except similar.SimilarError as exc:
            return {"error": str(exc), "rc": 1}
        except UnknownModel:
            return {"fallback": "unknown model"}
        if found is None:
            return {"fallback": "no usable index"}
        return {"hits": similar.listed(conn, found, limit)}
    finally:
        conn.close()


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        try:
            line = self.rfile.readline(MAX_REQUEST)
            request = json.loads(line)
            if isinstance(request, dict):
                with self.server.busy:
                    reply = answer(self.server.database, request)
            else:
                reply = {}
        except (ValueError, sqlite3.Error, OSError) as exc:
            reply = {"fallback": f"{type(exc).__name__}"}
        except Exception:  # a bug must not take the daemon's thread down; the CLI answers
            log.exception("query socket: answering failed")
            reply = {"fallback": "error"}
        reply = reply or {"fallback": "bad request"}
        if "fallback" not in reply:
            with self.server.lock:
                self.server.answered += 1
        with contextlib.suppress(OSError):  # the command gave up waiting: it answers itself
            self.wfile.write(json.dumps(reply).encode())


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    database: Path
    answered: int  # questions answered (not sent back to the command), for tests and logs
    lock: threading.Lock  # guards `answered`
    busy: threading.Lock  # one question at a time: a shared usearch view is not re-entrant


class QueryServer:
    """The listening socket and its thread, started and stopped with the daemon."""

    def __init__(self, database: str | Path) -> None:
        self.database = Path(database)
        self.path = socket_path(database)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (one logged reason) when the socket cannot be made: commands then
        answer themselves, as without a daemon."""
        from tagd.index.sidecache import folder_mode

        try:
            self.path.unlink(missing_ok=True)  # one daemon per database (its lock): a leftover
            server = _Server(str(self.path), _Handler, bind_and_activate=False)
            server.database, server.answered = self.database, 0
            server.lock, server.busy = threading.Lock(), threading.Lock()
            try:
                server.server_bind()
                os.chmod(self.path, folder_mode(self.database))
                server.server_activate()
            except BaseException:
                server.server_close()
                raise
        except OSError as exc:
            log.info(
                "query socket %s not opened (%s): `tagd similar` answers itself", self.path, exc
            )
            return False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="tagd-queries"
        )
        self._thread.daemon = True
        self._thread.start()
        return True

    @property
    def answered(self) -> int:
        return 0 if self._server is None else self._server.answered

    def stop(self) -> None:
        if self._server is None:
            return
        log.debug("query socket: %d questions answered", self._server.answered)
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        self._server = self._thread = None
