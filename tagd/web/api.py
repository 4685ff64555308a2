"""The JSON API (mirrors the CLI; the pages use it too, so other front-ends can exist)."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tagd.web import queries

if TYPE_CHECKING:
    from tagd.web.state import State

MAX_TAGS = 100


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def similar_of(
    state: State, conn: sqlite3.Connection, file_id: int, limit: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(nearest files, near duplicates among them at cosine >= 0.97); empty without
    embeddings."""
    from tagd.index.inventory import UnknownModel
    from tagd.search.similar import SimilarError, paths_of

    try:
        index = state.similar_index(conn)
        near = index.nearest_to_file(file_id, limit=limit)
    except (SimilarError, UnknownModel, ValueError):
        return [], []
    where = paths_of(conn, [f for f, _ in near])
    out = [
        {"sha256": where[f][1], "path": where[f][0], "similarity": round(s, 4)}
        for f, s in near
        if f in where
    ]
    return out, [o for o in out if o["similarity"] >= 0.97]


def routes(state: State) -> list[Route]:
    from tagd.web.state import (
        COUNT_BUDGET_S,
        MAX_LIMIT,
        SHA,
        int_param,
        search_page,
    )

    def search(request: Request) -> Response:
        p = request.query_params
        try:
            result = search_page(
                state,
                p.get("q", ""),
                p.get("sort", "score"),
                int_param(request, "limit", 100),
                int_param(request, "offset", 0),
                count_budget=COUNT_BUDGET_S if p.get("count", "1") != "0" else None,
            )
        except ValueError as exc:
            return _bad(str(exc))
        del result["file_ids"]
        return JSONResponse(result)

    def count(request: Request) -> Response:
        from tagd.index.inventory import UnknownModel
        from tagd.search.execute import count as count_of
        from tagd.search.query import QueryError, parse
        from tagd.search.types import SearchError

        q = request.query_params.get("q", "").strip() or "path:*"
        if len(q) > 1000:
            return _bad("query longer than 1000 characters")
        try:
            return JSONResponse({"count": count_of(state.ro(), parse(q))})
        except (QueryError, SearchError, UnknownModel) as exc:
            return _bad(str(exc.args[0]))

    def tags(request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        try:
            limit = int_param(request, "limit", 15)
        except ValueError as exc:
            return _bad(str(exc))
        if len(prefix) > 200 or not 1 <= limit <= MAX_TAGS:
            return _bad(f"prefix up to 200 characters, limit 1 to {MAX_TAGS}")
        state.counts.refresh_soon()
        return JSONResponse(queries.autocomplete(state.ro(), state.counts, prefix, limit))

    def file(request: Request) -> Response:
        sha = request.path_params["sha"]
        info = queries.file_info(state.ro(), sha) if SHA.match(sha) else None
        if info is None:
            return _bad("no such file in the index", 404)
        return JSONResponse(
            {
                "sha256": info.sha256,
                "paths": info.paths,
                "size": info.size,
                "width": info.width,
                "height": info.height,
                "format": info.format,
                "models": info.models,
                "thresholds": info.thresholds,
                "reviews": info.reviews,
                "effective": info.effective,
            }
        )

    def similar(request: Request) -> Response:
        sha = request.path_params["sha"]
        conn = state.ro()
        found = queries.file_by_sha(conn, sha) if SHA.match(sha) else None
        if found is None:
            return _bad("no such file in the index", 404)
        try:
            limit = int_param(request, "limit", 20)
        except ValueError as exc:
            return _bad(str(exc))
        if not 1 <= limit <= MAX_LIMIT:
            return _bad(f"limit must be 1 to {MAX_LIMIT}")
        near, dupes = similar_of(state, conn, found[0], limit)
        return JSONResponse({"similar": near, "near_duplicates": dupes, "paths": found[1]})

    async def do_review(request: Request) -> Response:
        from tagd.index import reviews as review

        sha = request.path_params["sha"]
        try:
            body = await request.json()
        except ValueError:
            return _bad('body must be JSON: {"accept": [...], "reject": [...], "clear": [...]}')
        if not isinstance(body, dict):
            return _bad("body must be a JSON object")
        changes: list[tuple[str, int | None]] = []
        for key, verdict in (("accept", 1), ("reject", -1), ("clear", None)):
            items = body.get(key, [])
            if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                return _bad(f"{key} must be a list of tag names")
            changes += [(t, verdict) for t in items]
        if not changes or len(changes) > MAX_TAGS:
            return _bad(f"give 1 to {MAX_TAGS} tags under accept, reject or clear")
        by = str(body.get("by") or "web")[:64]
        conn = state.rw()
        try:
            file_id, _ = review.resolve_file(conn, sha) if SHA.match(sha) else (None, None)
            if file_id is None:
                return _bad("no such file in the index", 404)
            done = review.apply(conn, file_id, changes, by)
        except review.ReviewError as exc:
            return _bad(str(exc), 404 if "not in the index" in str(exc) else 400)
        finally:
            conn.close()
        return JSONResponse(
            {"applied": [{"namespace": n, "tag": t, "verdict": v} for n, t, v in done]}
        )

    def queue_get(request: Request) -> Response:
        return JSONResponse(queries.queue_state(state.ro()))

    async def queue_action(request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("pause", "resume", "retry"):
            return _bad("action must be pause, resume or retry", 404)
        paths = None
        if action == "retry":
            try:
                body = await request.json() if await request.body() else {}
            except ValueError:
                return _bad('body must be JSON: {"paths": [...]} or empty')
            paths = body.get("paths") if isinstance(body, dict) else None
            if paths is not None and not (
                isinstance(paths, list) and all(isinstance(p, str) for p in paths)
            ):
                return _bad("paths must be a list of paths")
        conn = state.rw()
        try:
            if action == "retry":
                return JSONResponse({"retried": queries.retry(conn, paths)})
            queries.set_paused(conn, action == "pause")
            return JSONResponse({"paused": action == "pause"})
        finally:
            conn.close()

    return [
        Route("/api/search", search),
        Route("/api/count", count),
        Route("/api/tags", tags),
        Route("/api/files/{sha}", file),
        Route("/api/similar/{sha}", similar),
        Route("/api/files/{sha}/review", do_review, methods=["POST"]),
        Route("/api/queue", queue_get),
        Route("/api/queue/{action}", queue_action, methods=["POST"]),
    ]
