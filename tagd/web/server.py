"""Run the app with uvicorn: in the foreground (`tagd serve`) or in a thread (`tagd run`,
tests). The socket is bound here, so port 0 works and the real port is known."""

from __future__ import annotations

import logging
import socket
import threading
import time

from tagd.config import Config, WebConfig

log = logging.getLogger("tagd.web")


class WebServer:
    def __init__(self, config: Config, web: WebConfig) -> None:
        import uvicorn

        from tagd.web.app import create_app

        self.app = create_app(config, web)
        family = socket.AF_INET6 if ":" in web.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((web.host, web.port))
        except OSError as exc:
            self.sock.close()
            why = exc.strerror or exc
            raise OSError(f"cannot listen on {web.host}:{web.port}: {why}") from None
        self.host, self.port = web.host, self.sock.getsockname()[1]
        self.base_path = web.base_path
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.base_path}/"

    def serve(self) -> None:
        """Block until SIGINT/SIGTERM (uvicorn's handlers, main thread only)."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> None:
        """Serve from a thread (uvicorn installs no signal handlers off the main thread);
        returns once the server accepts connections."""
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="tagd-web", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.stop()
            raise OSError(f"the web server on {self.url} did not start")
        log.info("web UI on %s", self.url)

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.sock.close()
