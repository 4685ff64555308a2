"""The Starlette application: HTML pages, access control, thumbnails and originals.

Every file is served by content hash of an indexed, present file, never by a path taken from
the request. Reads use one read-only SQLite connection per server thread (WAL: beside a
running daemon); writes (review, queue actions) open a short writable connection.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import mimetypes
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Receive, Scope, Send

from tagd.config import Config, WebConfig
from tagd.db import DatabaseError, connect
from tagd.web import queries
from tagd.web.thumbs import PLACEHOLDER_SVG, Thumbnailer

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
        from tagd import similar

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
    from tagd.query import QueryError, parse
    from tagd.search import Hit, SearchError, SearchOptions, count, iter_search

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
    except SearchError as exc:
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


def create_app(config: Config, web: WebConfig | None = None, *, migrate: bool = True) -> Starlette:
    """The ASGI app for `config` (its `web:` section, or defaults); `migrate=False` never
    writes to the database (benchmarks on a shared index)."""
    from tagd.web import api

    web = web or config.web or WebConfig()
    state = build_state(config, web, migrate=migrate)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    base = web.base_path

    def page(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
        ctx = {
            "base": base,
            "csrf": state.csrf,
            "edits": web.allow_edits,
            "ns_order": NAMESPACE_ORDER,
            **ctx,
        }
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def grid(request: Request) -> Response:
        q = request.query_params.get("q", "")
        sort = request.query_params.get("sort", "score")
        try:
            offset = int_param(request, "offset", 0)
            result = search_page(
                state, q, sort, PAGE, offset, count_budget=COUNT_BUDGET_S, with_tags=False
            )
            error = None
        except ValueError as exc:
            result, error = {"count": 0, "hits": [], "unknown": [], "file_ids": []}, str(exc)
            offset = 0
        sidebar = queries.hits_tags(state.ro(), result["file_ids"])
        return page(
            request,
            "grid.html",
            {
                "q": q,
                "sort": sort,
                "offset": offset,
                "page": PAGE,
                "result": result,
                "error": error,
                "sidebar": sidebar,
            },
            400 if error else 200,
        )

    def image(request: Request) -> Response:
        sha = request.path_params["sha"]
        if not SHA.match(sha):
            return PlainTextResponse("not a sha256", status_code=404)
        conn = state.ro()
        info = queries.file_info(conn, sha)
        if info is None:
            return PlainTextResponse("no such file in the index", status_code=404)
        hydrus = config.hydrus
        hydrus_url = None
        if hydrus.enabled and queries.hydrus_known(conn, info.file_id):
            hydrus_url = f"{hydrus.url.rstrip('/')}/get_files/file?hash={sha}"
        try:
            pos = int_param(request, "i", -1)
        except ValueError:
            pos = -1
        return page(
            request,
            "image.html",
            {
                "info": info,
                "q": request.query_params.get("q", ""),
                "sort": request.query_params.get("sort", "score"),
                "pos": pos,
                "hydrus_url": hydrus_url,
            },
        )

    def queue_page(request: Request) -> Response:
        return page(request, "queue.html", {"state": queries.queue_state(state.ro())})

    async def login(request: Request) -> Response:
        if request.method == "POST":
            form = await request.form()
            given = str(form.get("token", ""))
            if state.token and hmac.compare_digest(given.encode(), state.token.encode()):
                resp = RedirectResponse(f"{base}/", status_code=303)
                resp.set_cookie(
                    COOKIE,
                    given,
                    httponly=True,
                    samesite="strict",
                    path=base or "/",
                    secure=request.url.scheme == "https",
                    max_age=30 * 86400,
                )
                return resp
            return page(request, "login.html", {"failed": True}, 401)
        return page(request, "login.html", {"failed": False})

    def thumb(request: Request) -> Response:
        sha = request.path_params["sha"]
        if not SHA.match(sha):
            return PlainTextResponse("not a sha256", status_code=404)
        conn = state.ro()
        found = queries.file_by_sha(conn, sha)
        if found is None:
            return PlainTextResponse("no such file in the index", status_code=404)
        made = state.thumbs.get(sha, lambda: [p for p in found[1] if _allowed(state, p)])
        if made is None:
            return Response(
                PLACEHOLDER_SVG,
                media_type="image/svg+xml",
                headers={"cache-control": "no-cache"},
            )
        return FileResponse(
            made,
            media_type="image/webp",
            headers={"cache-control": "public, max-age=31536000, immutable"},
        )

    def original(request: Request) -> Response:
        sha = request.path_params["sha"]
        if not SHA.match(sha):
            return PlainTextResponse("not a sha256", status_code=404)
        found = queries.file_by_sha(state.ro(), sha)
        if found is None:
            return PlainTextResponse("no such file in the index", status_code=404)
        for path in found[1]:
            if _allowed(state, path):
                kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
                return FileResponse(
                    path,
                    media_type=kind,
                    headers={
                        "cache-control": "private, max-age=3600",
                        "content-disposition": "inline",
                    },
                )
        return PlainTextResponse("the file is not readable under a watch root", status_code=404)

    routes = [
        Route("/", grid),
        Route("/image/{sha}", image),
        Route("/queue", queue_page),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/thumbs/{sha}", thumb),
        Route("/files/{sha}", original),
        *api.routes(state),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    if base:
        routes = [Mount(base, routes=routes), Route("/", lambda r: RedirectResponse(f"{base}/"))]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.thumbs.close()

    app = Starlette(routes=routes, middleware=[Middleware(Guard, state=state)], lifespan=lifespan)
    app.state.tagd = state
    return app


def _allowed(state: State, path: str) -> bool:
    """A regular file whose real path lies under a watch root (no symlink escape)."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return False
    if not state.roots:
        return True
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in state.roots)
