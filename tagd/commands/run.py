"""`tagd run`: the foreground service (what systemd starts)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
from typing import TYPE_CHECKING, Any

from tagd.commands import Context, UserError

if TYPE_CHECKING:
    from tagd.config import Config

log = logging.getLogger("tagd.run")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="watch the folders and tag continuously (the service)",
        description="Run in the foreground: watch every root, tag new and changed images, "
        "rescan on a schedule. SIGTERM stops after the batch in flight, SIGHUP reloads the "
        "config. Under systemd it reports readiness, status and watchdog pings.",
        epilog="example: tagd --config /etc/tagd/config.yaml run",
    )
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.service.notify import Notifier
    from tagd.tagging.hub import ModelError

    config = ctx.config
    if not config.watch:
        raise UserError("nothing to watch: add a folder under `watch:` in the config", 2)
    from tagd.service.daemon import DaemonRunning, hold_daemon_lock

    try:
        lock = hold_daemon_lock(config.database)
    except DaemonRunning as exc:
        raise UserError(str(exc), 1) from None
    except OSError as exc:
        raise UserError(f"cannot lock {config.database}.daemon.lock: {exc}", 1) from None
    _check_web(config)
    stop = {"requested": False}
    # Until the daemon exists, a SIGTERM during model loading just ends the start cleanly.
    signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    notifier = Notifier()
    notifier.status("loading models")
    from tagd.index.db import DatabaseError
    from tagd.service.daemon import Daemon
    from tagd.tagging import tagger

    try:
        taggers = tagger.load_all(config)
    except ModelError as exc:
        raise UserError(str(exc)) from None
    if stop["requested"]:
        return 0
    try:
        daemon = Daemon(config, taggers, notifier=notifier)
    except DatabaseError as exc:
        raise UserError(str(exc)) from None
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, daemon.request_reload)
    web = _web_server(config)
    try:
        if web is not None:
            web.start()
        return daemon.run()
    except ModelError as exc:  # a cluster that cannot be joined (tagd/cluster)
        raise UserError(str(exc)) from None
    finally:
        if web is not None:
            web.stop()
        os.close(lock)


def _check_web(config: Config) -> None:
    """Refuse a `web:` section that cannot serve before any model loads."""
    if config.web is None:
        return
    from tagd.web import missing_dependency

    problem = missing_dependency()
    if problem:
        raise UserError(f"web: {problem}", 2)
    from tagd.config import ConfigError
    from tagd.web.state import WebError, check_access

    try:
        check_access(config.web)
    except (WebError, ConfigError) as exc:
        raise UserError(str(exc), 2) from None


def _web_server(config: Config) -> Any:
    """The web UI `tagd run` serves when the config has `web:` (the database exists now)."""
    if config.web is None:
        return None
    from tagd.config import ConfigError
    from tagd.web.server import WebServer
    from tagd.web.state import WebError

    try:
        return WebServer(config, config.web)
    except (WebError, ConfigError) as exc:
        raise UserError(str(exc), 2) from None
    except OSError as exc:
        raise UserError(f"web: {exc}", 3) from None
