"""A local stand-in for the Hydrus Client API: the endpoints tagd uses, with Hydrus's rules.

It checks the access-key header and the JSON shapes the docs specify, remembers deleted
mappings (and honours override_previously_deleted_mappings), and can be told to fail with a
status code or to answer slowly, so tests see what a real client would send and get.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HEADER = "Hydrus-Client-API-Access-Key"
LOCAL_TAGS_KEY = "6c6f63616c2074616773"  # hex of "local tags", as in the docs
TAGD_KEY = "74616764"  # hex of "tagd"


@dataclass
class HydrusState:
    access_key: str = "a" * 64
    services: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            LOCAL_TAGS_KEY: {"name": "my tags", "type": 5, "type_pretty": "local tag service"},
            TAGD_KEY: {"name": "tagd", "type": 5, "type_pretty": "local tag service"},
            "616c6c206b6e6f776e2074616773": {
                "name": "all known tags",
                "type": 10,
                "type_pretty": "virtual combined tag service",
            },
        }
    )
    # sha256 → service key → {"0": current, "2": deleted}
    files: dict[str, dict[str, dict[str, set[str]]]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    # path → how many calls to it succeed; later ones fail with HTTP 500 (a sync cut short)
    fail_after: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0

    def add_file(self, sha256: str) -> None:
        self.files.setdefault(sha256, {})

    def tags(self, sha256: str, service: str, status: str = "0") -> set[str]:
        return self.files[sha256].setdefault(service, {"0": set(), "2": set()})[status]

    def human_delete(self, sha256: str, service: str, tag: str) -> None:
        """Hydrus's deletion: gone from current, kept as a deletion record."""
        self.tags(sha256, service, "0").discard(tag)
        self.tags(sha256, service, "2").add(tag)

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]


class _Handler(BaseHTTPRequestHandler):
    state: HydrusState

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, body: Any) -> None:
        raw = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (timeout tests)

    def _handle(self, method: str) -> None:
        st = self.state
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        body: Any = None
        if method == "POST":
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Type") != "application/json":
                return self._send(400, {"error": "POST bodies must be application/json"})
            try:
                body = json.loads(raw)
            except ValueError:
                return self._send(400, {"error": "body is not JSON"})
        st.requests.append(
            {
                "method": method,
                "path": url.path,
                "query": query,
                "body": body,
                "headers": {k.lower(): v for k, v in self.headers.items()},
            }
        )
        if st.delay_s:
            time.sleep(st.delay_s)
        if url.path in st.fail:
            return self._send(st.fail[url.path], {"error": "forced failure"})
        if len(st.calls(url.path)) > st.fail_after.get(url.path, len(st.requests)):
            return self._send(500, {"error": "forced failure after earlier calls"})
        if url.path == "/api_version":
            return self._send(200, {"version": 80, "hydrus_version": 640})
        key = self.headers.get(HEADER)
        if key is None:
            return self._send(401, {"error": "no access key"})
        if key != st.access_key:
            return self._send(403, {"error": "unknown access key"})
        route = {
            ("GET", "/verify_access_key"): self._verify,
            ("GET", "/get_services"): self._services,
            ("GET", "/get_files/file_metadata"): self._metadata,
            ("POST", "/add_tags/add_tags"): self._add_tags,
        }.get((method, url.path))
        if route is None:
            return self._send(404, {"error": f"no endpoint {url.path}"})
        code, answer = route(query, body)
        self._send(code, answer)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _verify(self, query: dict, body: Any) -> tuple[int, Any]:
        return 200, {"basic_permissions": [0, 1, 2, 3], "human_description": "tagd test"}

    def _services(self, query: dict, body: Any) -> tuple[int, Any]:
        st = self.state
        local = [
            {"name": v["name"], "service_key": k} for k, v in st.services.items() if v["type"] == 5
        ]
        return 200, {"local_tags": local, "services": st.services}

    def _metadata(self, query: dict, body: Any) -> tuple[int, Any]:
        try:
            hashes = json.loads(query["hashes"])
        except (KeyError, ValueError):
            return 400, {"error": "hashes must be percent-encoded JSON"}
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            return 400, {"error": "hashes must be a list of strings"}
        out = []
        for i, h in enumerate(hashes):
            if h not in self.state.files:
                out.append({"file_id": None, "hash": h})
                continue
            tags = {
                sk: {"storage_tags": {s: sorted(v) for s, v in by.items() if v}, "display_tags": {}}
                for sk, by in self.state.files[h].items()
            }
            out.append({"file_id": 1000 + i, "hash": h, "tags": tags})
        return 200, {"metadata": out}

    def _add_tags(self, query: dict, body: Any) -> tuple[int, Any]:
        st = self.state
        if not isinstance(body, dict) or not isinstance(body.get("hashes"), list):
            return 400, {"error": "need hashes"}
        actions = body.get("service_keys_to_actions_to_tags")
        if not isinstance(actions, dict):
            return 400, {"error": "need service_keys_to_actions_to_tags"}
        override = body.get("override_previously_deleted_mappings", True)
        for sk, by_action in actions.items():
            if sk not in st.services:
                return 400, {"error": f"unknown service {sk}"}
            for action, tags in by_action.items():
                if action not in ("0", "1") or not isinstance(tags, list):
                    return 400, {"error": "only actions 0 and 1 (local services) are supported"}
                for h in body["hashes"]:
                    if h not in st.files:
                        continue
                    for t in tags:
                        if action == "1":  # delete: leaves a deletion record, like Hydrus
                            st.human_delete(h, sk, t)
                            continue
                        if t in st.tags(h, sk, "2") and not override:
                            continue
                        st.tags(h, sk, "2").discard(t)
                        st.tags(h, sk, "0").add(t)
        return 200, None


class HydrusServer:
    """`with HydrusServer() as h:` serves on 127.0.0.1:<free port> until the block ends."""

    def __init__(self, state: HydrusState | None = None) -> None:
        self.state = state or HydrusState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HydrusServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
