"""The Starlette application: HTML pages, access control, thumbnails and originals.

Every file is served by content hash of an indexed, present file, never by a path taken from
the request. Reads use one read-only SQLite connection per server thread (WAL: beside a
running daemon); writes (review, queue actions) open a short writable connection.
"""

from __future__ import annotations

import contextlib
import hmac
import mimetypes
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tagd.config import Config, WebConfig
from tagd.tagging import media
from tagd.web import queries
from tagd.web.state import (
    COOKIE,
    COUNT_BUDGET_S,
    HERE,
    NAMESPACE_ORDER,
    PAGE,
    SHA,
    Guard,
    State,
    build_state,
    int_param,
    search_page,
)
from tagd.web.thumbs import PLACEHOLDER_SVG, readable_under

# Browsers pick a player by content type; the system's mime table may lack some of these.
VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".mov": "video/quicktime",
    ".avi": "video/x-msvideo",
}


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
        seed = None
        try:
            offset = int_param(request, "offset", 0)
            if request.query_params.get("seed"):
                seed = int_param(request, "seed", 0)
            result = search_page(
                state,
                q,
                sort,
                PAGE,
                offset,
                count_budget=COUNT_BUDGET_S,
                with_tags=False,
                seed=seed,
            )
            seed = result.get("seed")
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
                "seed": seed,
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
        # Hydrus's file URLs need the access key, which must never reach a page: say where
        # the file is instead, and how to find it in the Hydrus client.
        in_hydrus = (
            hydrus.service if hydrus.enabled and queries.hydrus_known(conn, info.file_id) else None
        )
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
                "seed": request.query_params.get("seed", ""),
                "pos": pos,
                "in_hydrus": in_hydrus,
                "is_video": any(media.is_video_path(p) for p in info.paths),
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

    def indexed(request: Request) -> tuple[str, Any] | Response:
        """(sha256, the file's id and present paths) for the route's hash, or the 404."""
        sha = request.path_params["sha"]
        if not SHA.match(sha):
            return PlainTextResponse("not a sha256", status_code=404)
        found = queries.file_by_sha(state.ro(), sha)
        if found is None:
            return PlainTextResponse("no such file in the index", status_code=404)
        return sha, found

    def thumb(request: Request) -> Response:
        looked_up = indexed(request)
        if isinstance(looked_up, Response):
            return looked_up
        sha, found = looked_up
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
        looked_up = indexed(request)
        if isinstance(looked_up, Response):
            return looked_up
        _, found = looked_up
        for path in found[1]:
            if _allowed(state, path):
                kind = (
                    VIDEO_TYPES.get(os.path.splitext(path)[1].lower())
                    or mimetypes.guess_type(path)[0]
                    or "application/octet-stream"
                )
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
    return readable_under(path, state.roots)
