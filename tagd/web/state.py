"""What the web app's pages and its JSON API share: limits, access checks, the open
index (State) and the search page both render."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    RedirectResponse,
    Response,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from tagd.config import Config, WebConfig
from tagd.index.db import DatabaseError, connect
from tagd.web import queries
from tagd.web.thumbs import Thumbnailer

HERE = Path(__file__).parent
MAX_QUERY = 1000
MAX_LIMIT = 500
MAX_OFFSET = 1_000_000
PAGE = 100
COUNT_BUDGET_S = 0.01
SHA = re.compile(r"^[0-9a-f]{64}$")
SORTS = ("score", "newest", "random")
NAMESPACE_ORDER = ("rating", "character", "copyright", "artist", "general", "meta")
COOKIE = "tagd_token"


class WebError(Exception):
    """Refused before starting: one line naming the key or flag and the fix."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class State:
    config: Config
    web: WebConfig
    token: str | None
    csrf: str
    thumbs: Thumbnailer
    counts: queries.TagCounts
    roots: tuple[str, ...]

    def __post_init__(self) -> None:
        self._local = threading.local()
        self._sim_lock = threading.Lock()
        self._sim: Any = None

    def ro(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.config.database, readonly=True)
            self._local.conn = conn
        return conn

    def rw(self) -> sqlite3.Connection:
        return connect(self.config.database)

    def similar_index(self, conn: sqlite3.Connection) -> Any:
        """The embedding index, reopened only when its signature changed."""
        from tagd.search import similar

        with self._sim_lock:
            model_id, _ = similar.pick_model(conn, None)
            sig = similar.signature(conn, model_id)
            if self._sim is None or self._sim[0] != sig:
                db = str(self.config.database)
                self._sim = (sig, similar.EmbeddingIndex.open(conn, db, None))
            return self._sim[1]


def check_access(web: WebConfig) -> str | None:
    """The access token; a WebError when binding beyond loopback without one."""
    token = web.access_token()
    if not is_loopback(web.host) and not token:
        raise WebError(
            f"refusing to serve on {web.host} without an access token: anyone on the network "
            "could read the gallery. Set web.token_file (or web.token / web.token_env), or "
            "bind to 127.0.0.1"
        )
    return token


def build_state(config: Config, web: WebConfig, *, migrate: bool = True) -> State:
    token = check_access(web)
    if not Path(config.database).exists():
        raise WebError(f"database {config.database} does not exist yet: run `tagd scan` first")
    # Bring the schema up to date (reviews table); a read-only database still serves.
    if migrate:
        with contextlib.suppress(DatabaseError, sqlite3.Error):
            connect(config.database).close()
    thumb_dir = web.thumbnail_dir or Path(f"{config.database}.thumbs")
    roots = tuple(os.path.realpath(r.path) for r in config.watch)
    state = State(
        config,
        web,
        token,
        secrets.token_urlsafe(32),
        Thumbnailer(thumb_dir, web.thumbnail_size, max_pixels=config.max_image_pixels),
        queries.TagCounts(lambda: connect(config.database, readonly=True)),
        roots,
    )
    state.counts.refresh_soon()
    return state


class Guard:
    """Access token (cookie or Bearer), CSRF on writes, and security headers on every answer."""

    OPEN = ("/login", "/static/")

    def __init__(self, app: ASGIApp, state: State) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = scope["path"][len(self.state.web.base_path) :] or "/"
        refusal = self.check(request, path)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                    (
                        b"content-security-policy",
                        b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
                        b"script-src 'self'; object-src 'none'; base-uri 'none'; "
                        b"frame-ancestors 'none'",
                    ),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_headers)

    def authorised(self, request: Request) -> tuple[bool, bool]:
        """(may read, came with a Bearer header)."""
        token = self.state.token
        auth = request.headers.get("authorization", "")
        bearer = auth[7:] if auth.lower().startswith("bearer ") else None
        if token is None:
            return True, bearer is not None
        for given in (bearer, request.cookies.get(COOKIE)):
            if given and hmac.compare_digest(given.encode(), token.encode()):
                return True, given is bearer
        return False, False

    def check(self, request: Request, path: str) -> Response | None:
        if path.startswith(self.OPEN):
            return None
        ok, bearer = self.authorised(request)
        api = path.startswith("/api/")
        if not ok:
            if api or request.method != "GET":
                return JSONResponse({"error": "access token required"}, status_code=401)
            base = self.state.web.base_path
            return RedirectResponse(f"{base}/login", status_code=303)
        if request.method in ("GET", "HEAD"):
            return None
        if not self.state.web.allow_edits:
            return JSONResponse(
                {"error": "edits are off: set web.allow_edits: true in the config"},
                status_code=403,
            )
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return JSONResponse({"error": "cross-origin request refused"}, status_code=403)
        given = request.headers.get("x-csrf-token", "")
        if not bearer and not hmac.compare_digest(given.encode(), self.state.csrf.encode()):
            return JSONResponse(
                {"error": "missing or stale CSRF token: reload the page"}, status_code=403
            )
        return None


def search_page(
    state: State,
    q: str,
    sort: str,
    limit: int,
    offset: int,
    *,
    count_budget: float | None,
    with_tags: bool = True,
) -> dict[str, Any]:
    """One page of results as the API returns it; raises ValueError with a user message."""
    from tagd.index.inventory import UnknownModel
    from tagd.search.execute import count, iter_search
    from tagd.search.query import QueryError, parse
    from tagd.search.types import Hit, SearchError, SearchOptions

    if len(q) > MAX_QUERY:
        raise ValueError(f"query longer than {MAX_QUERY} characters")
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1 to {MAX_LIMIT}")
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset must be 0 to {MAX_OFFSET}")
    text = q.strip() or "path:*"
    try:
        node = parse(text)
    except QueryError as exc:
        raise ValueError(f"bad query at column {exc.column + 1}: {exc.args[0]}") from None
    conn = state.ro()
    mode = {"score": "score", "newest": "mtime", "random": "random"}[sort]
    opts = SearchOptions(sort=mode, limit=limit, offset=offset, with_tags=with_tags)
    try:
        if not q.strip() and sort != "random":
            hits = [
                Hit(path, sha, {}, fid)
                for path, fid, sha in queries.browse(conn, sort == "newest", limit, offset)
            ]
        else:
            hits = [h for h in iter_search(conn, node, opts) if h.file_id and h.sha256]
    except (SearchError, UnknownModel) as exc:
        raise ValueError(str(exc)) from None
    found = queries.dims(conn, [h.file_id for h in hits if h.file_id])
    total = None
    if count_budget is not None:
        total = _count_within(conn, lambda: count(conn, node), count_budget)
    unknown = []
    for term in queries.plain_tags(node):
        if not queries.tag_names(conn, term):
            unknown.append({"tag": term.name, "suggest": state.counts.suggest(conn, term.name)})
    return {
        "count": total,
        "hits": [
            {
                "sha256": h.sha256,
                "path": h.path,
                "width": found.get(h.file_id or 0, (None, None))[0],
                "height": found.get(h.file_id or 0, (None, None))[1],
                "tags": h.tags,
            }
            for h in hits
        ],
        "unknown": unknown,
        "file_ids": [h.file_id for h in hits],
    }


def _count_within(conn: sqlite3.Connection, fn: Any, budget: float) -> int | None:
    """The count if SQLite finishes it within `budget` seconds, else None (shown later)."""
    deadline = time.monotonic() + budget
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 2000)
    try:
        return int(fn())
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc):
            return None
        raise
    finally:
        conn.set_progress_handler(None, 0)


def int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number") from None
