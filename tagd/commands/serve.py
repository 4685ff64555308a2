"""`tagd serve`: the web UI over the index (gallery grid, image pages, review, queue)."""

from __future__ import annotations

import argparse
import dataclasses

from tagd.commands import Context, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="web UI: gallery grid, tag autocomplete, image pages, tag review",
        description="Serve the web UI on the index (read-only SQLite connections, so it runs "
        "beside the daemon). Settings come from `web:` in the config; the flags override it. "
        "Any address but loopback needs web.token / token_file / token_env.",
        epilog="example: tagd serve --port 8765   (then open http://127.0.0.1:8765/)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1, or web.host)")
    p.add_argument("--port", type=int, help="port (default 8765, or web.port)")
    p.add_argument(
        "--allow-edits", action="store_true", help="review and queue actions on (web.allow_edits)"
    )
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.web import missing_dependency

    problem = missing_dependency()
    if problem:
        raise UserError(problem, 2)
    from tagd.config import ConfigError, WebConfig
    from tagd.web.server import WebServer
    from tagd.web.state import WebError

    config = ctx.config
    web = config.web or WebConfig()
    changes: dict[str, object] = {}
    if ctx.args.host:
        changes["host"] = ctx.args.host
    if ctx.args.port is not None:
        if not 0 <= ctx.args.port <= 65535:
            raise UserError(f"--port {ctx.args.port}: give a port from 0 to 65535", 2)
        changes["port"] = ctx.args.port
    if ctx.args.allow_edits:
        changes["allow_edits"] = True
    web = dataclasses.replace(web, **changes)  # type: ignore[arg-type]
    try:
        server = WebServer(config, web)
    except (WebError, ConfigError) as exc:
        raise UserError(str(exc), 2) from None
    except OSError as exc:
        raise UserError(str(exc), 3) from None
    print(f"tagd web UI on {server.url} (Ctrl-C stops)", flush=True)
    server.serve()
    return 0
