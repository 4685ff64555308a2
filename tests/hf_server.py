"""A local stand-in for the Hugging Face Hub's file endpoints, so the real download code in
huggingface_hub (HEAD for metadata, then GET) runs in the tests without a network."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class HubServer:
    """Serves `{repo}/resolve/{revision}/{file}` for the repos given as {repo_id: folder}."""

    def __init__(
        self, repos: dict[str, Path], commit: str, gated: frozenset[str] = frozenset()
    ) -> None:
        self.repos = repos
        self.commit = commit
        self.gated = gated
        self.requests: list[tuple[str, str]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                server.requests.append((self.command, self.path))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 5 or parts[2] != "resolve":
                    return self._error(404, "EntryNotFound")
                repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                if repo in server.gated:
                    return self._error(403, "GatedRepo")
                if repo not in server.repos:
                    return self._error(401, "RepoNotFound")
                if revision not in ("main", server.commit):
                    return self._error(404, "RevisionNotFound")
                path = server.repos[repo] / name
                if not path.is_file():
                    return self._error(404, "EntryNotFound")
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", server.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, code: int, kind: str) -> None:
                self.send_response(code)
                self.send_header("X-Error-Code", kind)
                self.send_header("X-Error-Message", kind)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
