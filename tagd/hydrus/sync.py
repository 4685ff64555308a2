"""Hydrus Client API sync: push each file's effective tags to a Hydrus tag service, by SHA-256.

Only files Hydrus knows get tags. Tags go out in Hydrus conventions (lowercase, spaces,
`character:`/`rating:`/`creator:` namespaces). A sync adds only what is missing, never a tag
that Hydrus records as deleted or that tagd added before and a human has since removed
(`hydrus_pushed`), and skips files whose effective tags are unchanged since the last check.
The access key is read from a file or the environment and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tagd.config import DEFAULT_NAMESPACES, HydrusConfig
from tagd.index import hydrus_state, paths
from tagd.index.hydrus_state import Pushed
from tagd.outputs.effective import FileTagSet, iter_files
from tagd.tagtext import hydrus_tag

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_NAMESPACES", "HydrusConfig", "access_key", "hydrus_tag"]

KEY_HEADER = "Hydrus-Client-API-Access-Key"
LOCAL_TAG_SERVICE = 5
CURRENT, PENDING, DELETED = "0", "1", "2"  # storage statuses in file metadata
ADD, DELETE = "0", "1"  # content actions on a local tag service


class HydrusError(Exception):
    """Hydrus is unreachable, refused us, or answered something unexpected; phrased for users.

    Credentials in a URL (`http://user:secret@host`) never reach the message."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def redact(text: str) -> str:
    """`scheme://user:password@host` → `scheme://***@host`, wherever it occurs in `text`."""
    return _USERINFO.sub(r"\1***@", text)


def split_userinfo(url: str) -> tuple[str, str | None]:
    """The URL without `user:password@`, and those credentials as a Basic Authorization value
    (for a reverse proxy in front of Hydrus), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    user = urllib.parse.unquote(parts.username or "")
    password = urllib.parse.unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), f"Basic {token}"


def access_key(cfg: HydrusConfig) -> str:
    """The key from access_key_file, else $access_key_env; a HydrusError if neither."""
    if cfg.access_key_file is not None:
        try:
            key = cfg.access_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise HydrusError(
                f"hydrus.access_key_file: cannot read {cfg.access_key_file}: {exc.strerror or exc}"
            ) from None
        if not key:
            raise HydrusError(f"hydrus.access_key_file: {cfg.access_key_file} is empty")
        return key
    key = os.environ.get(cfg.access_key_env, "").strip()
    if not key:
        raise HydrusError(
            f"no Hydrus access key: set hydrus.access_key_file or ${cfg.access_key_env} "
            "(Hydrus: services > review services > client api > add)"
        )
    return key


def desired_tags(fs: FileTagSet, cfg: HydrusConfig) -> list[str]:
    out = {hydrus_tag(t.namespace, t.name, cfg.namespaces, cfg.tag_template) for t in fs.tags}
    return sorted(t for t in out if t)


def _digest(tags: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(tags)).encode()).hexdigest()[:32]


class Client:
    """The few Client API endpoints tagd uses, over urllib (no extra HTTP dependency)."""

    def __init__(self, url: str, access_key: str, timeout: float = 10.0) -> None:
        try:
            clean, self._auth = split_userinfo(url.rstrip("/"))
        except ValueError:
            raise HydrusError(f"hydrus.url {url}: not a valid URL (check the port)") from None
        self.url = clean
        self._key = access_key
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client({self.url!r}, access_key=<hidden>)"

    def _request(self, path: str, *, params: dict[str, Any] | None = None, body: Any = None) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(
                {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
            )
        headers = {KEY_HEADER: self._key, "Accept": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(
            url, data=data, headers=headers, method="POST" if data else "GET"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise HydrusError(_http_error(exc, path)) from None
        except TimeoutError:
            raise HydrusError(
                f"Hydrus at {self.url} did not answer {path} within {self.timeout:g} s "
                "(busy? raise hydrus.timeout)"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, TimeoutError):
                raise HydrusError(
                    f"Hydrus at {self.url} did not answer {path} within {self.timeout:g} s "
                    "(busy? raise hydrus.timeout)"
                ) from None
            raise HydrusError(
                f"cannot reach Hydrus at {self.url} "
                f"({getattr(reason, 'strerror', None) or reason}); "
                "is the client running with the Client API service enabled?"
            ) from None
        except (ConnectionError, OSError) as exc:
            raise HydrusError(f"connection to Hydrus at {self.url} failed: {exc}") from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise HydrusError(f"Hydrus answered {path} with something that is not JSON") from None

    def api_version(self) -> int:
        return int(self._request("/api_version")["version"])

    def verify_access_key(self) -> dict[str, Any]:
        return self._request("/verify_access_key")

    def tag_service_key(self, name: str) -> str:
        """The service key of the local tag service called `name`."""
        answer = self._request("/get_services")
        found: dict[str, str] = {}
        services = answer.get("services")
        if isinstance(services, dict):
            for key, info in services.items():
                if info.get("type") == LOCAL_TAG_SERVICE:
                    found[str(info.get("name"))] = str(key)
        for info in answer.get("local_tags", []) if not found else []:
            found[str(info.get("name"))] = str(info.get("service_key"))
        if name not in found:
            names = ", ".join(sorted(found)) or "none"
            raise HydrusError(
                f"Hydrus has no local tag service named {name!r} (local tag services: {names}); "
                "create it under services > manage services, or set hydrus.service"
            )
        return found[name]

    def file_tags(
        self, hashes: Sequence[str], service_key: str
    ) -> dict[str, tuple[set[str], set[str]] | None]:
        """sha256 → (current+pending tags, deleted tags) on the service; None if Hydrus lacks it."""
        answer = self._request(
            "/get_files/file_metadata",
            params={"hashes": list(hashes), "include_services_object": "false"},
        )
        out: dict[str, tuple[set[str], set[str]] | None] = dict.fromkeys(hashes)
        for meta in answer.get("metadata", []):
            sha = str(meta.get("hash", "")).lower()
            if sha not in out or meta.get("file_id") is None:
                continue
            storage = (meta.get("tags") or {}).get(service_key, {}).get("storage_tags", {})
            present = set(storage.get(CURRENT, [])) | set(storage.get(PENDING, []))
            out[sha] = (present, set(storage.get(DELETED, [])))
        return out

    def add_tags(
        self,
        hashes: Sequence[str],
        service_key: str,
        tags: Sequence[str],
        *,
        override_deleted: bool = False,
    ) -> None:
        """Add to a local tag service; a deletion record blocks a tag unless overridden."""
        self._request(
            "/add_tags/add_tags",
            body={
                "hashes": list(hashes),
                "service_keys_to_actions_to_tags": {service_key: {ADD: list(tags)}},
                "override_previously_deleted_mappings": override_deleted,
            },
        )

    def delete_tags(self, hashes: Sequence[str], service_key: str, tags: Sequence[str]) -> None:
        self._request(
            "/add_tags/add_tags",
            body={
                "hashes": list(hashes),
                "service_keys_to_actions_to_tags": {service_key: {DELETE: list(tags)}},
            },
        )


def _http_error(exc: urllib.error.HTTPError, path: str) -> str:
    try:
        detail = exc.read().decode("utf-8", "replace").strip().splitlines()[0][:200]
    except (OSError, IndexError):
        detail = ""
    if exc.code in (401, 403, 419):
        return (
            f"Hydrus refused the access key for {path} (HTTP {exc.code}); check the key and "
            "that it has the 'edit file tags' and 'search for files' permissions"
        )
    return f"Hydrus answered {path} with HTTP {exc.code}" + (f": {detail}" if detail else "")


@dataclass
class SyncReport:
    dry_run: bool = False
    considered: int = 0
    checked: int = 0
    unknown: int = 0
    files_updated: int = 0
    tags_added: int = 0
    tags_removed: int = 0
    kept_deleted: int = 0
    planned: dict[str, list[str]] = field(default_factory=dict)

    def line(self) -> str:
        add, remove = ("would add", "would remove") if self.dry_run else ("added", "removed")
        return (
            f"hydrus: {self.checked} of {self.considered} files checked, {self.unknown} not in "
            f"Hydrus; {add} {self.tags_added} tags to {self.files_updated} files, {remove} "
            f"{self.tags_removed} no longer effective; "
            f"{self.kept_deleted} tags left out because they were deleted in Hydrus"
        )


@dataclass(frozen=True)
class FilePlan:
    add: list[str]
    readd: list[str]
    remove: list[str]
    pushed: set[str]
    retracted: set[str]
    kept_deleted: int


def plan_file(
    desired: Sequence[str],
    present: set[str],
    deleted: set[str],
    pushed: set[str],
    retracted: set[str],
    retract: bool,
) -> FilePlan:
    """What to send for one file. Pure, so the rules are testable on their own.

    A human's deletion (a deletion record, or a tag tagd pushed that is gone) is final. A tag
    tagd pushed that is no longer desired is removed, if `retract`; if it is desired again
    later it is re-added past the deletion record tagd itself left.
    """
    removed_by_human = (pushed - present) | (deleted - retracted)
    want = set(desired)
    add = [t for t in desired if t not in present | pushed | deleted]
    readd = [t for t in desired if t in retracted and t in deleted and t not in present]
    remove = sorted((pushed & present) - want) if retract else []
    kept = len([t for t in desired if t in removed_by_human and t not in retracted])
    return FilePlan(
        add=add,
        readd=readd,
        remove=remove,
        pushed=(pushed - set(remove)) | set(add) | set(readd),
        retracted=(retracted - set(add) - set(readd)) | set(remove),
        kept_deleted=kept,
    )


@dataclass
class _Pending:
    """One file's record while its groups go out: what Hydrus has confirmed so far."""

    file_id: int
    digest: str
    pushed: set[str]
    retracted: set[str]
    calls_left: int


PREV_CHUNK = 512


def _changed(
    conn: sqlite3.Connection, cfg: HydrusConfig, service_key: str, report: SyncReport, now: float
) -> Iterator[tuple[FileTagSet, list[str], str, Pushed | None]]:
    """Files whose effective tags changed since the last sync (or worth a recheck), streamed:
    at most PREV_CHUNK files and their records are in memory at a time."""
    chunk: list[FileTagSet] = []

    def flush() -> Iterator[tuple[FileTagSet, list[str], str, Pushed | None]]:
        prev = hydrus_state.previous(conn, service_key, [fs.file_id for fs in chunk])
        for fs in chunk:
            desired = desired_tags(fs, cfg)
            digest = _digest(desired)
            p = prev.get(fs.file_id)
            fresh = p is not None and (p.known or now - p.checked_at < cfg.recheck_unknown_after)
            if p is not None and p.desired_hash == digest and fresh:
                continue
            if desired or (cfg.retract and p is not None and p.pushed):
                yield fs, desired, digest, p
        chunk.clear()

    for fs in iter_files(conn, models=cfg.models or None):
        report.considered += 1
        chunk.append(fs)
        if len(chunk) >= PREV_CHUNK:
            yield from flush()
    yield from flush()


def _batches(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _row(p: _Pending, known: bool, now: float) -> tuple[int, Pushed]:
    # A file with calls still to make keeps no digest, so the next sync plans it again.
    digest = p.digest if p.calls_left == 0 else ""
    return p.file_id, Pushed(known, digest, frozenset(p.pushed), now, frozenset(p.retracted))


def sync(
    conn: sqlite3.Connection,
    config: Any,
    dry_run: bool = False,
    *,
    client: Client | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """One pass over the index; the daemon schedules this every `hydrus.interval` seconds.

    Each request's outcome is recorded as soon as Hydrus accepts it: tags tagd added or
    removed must never later count as a human's, even if a later request fails or the daemon
    stops mid-sync.
    """
    cfg: HydrusConfig = config.hydrus if isinstance(config.hydrus, HydrusConfig) else HydrusConfig()
    client = client or Client(cfg.url, access_key(cfg), cfg.timeout)
    client.api_version()
    service_key = client.tag_service_key(cfg.service)
    now = time.time()
    report = SyncReport(dry_run=dry_run)
    total = paths.present_file_count(conn)
    for batch in _batches(_changed(conn, cfg, service_key, report, now), cfg.batch_size):
        remote = client.file_tags([fs.sha256 for fs, _, _, _ in batch], service_key)
        settled: list[tuple[int, Pushed]] = []
        pending: dict[str, _Pending] = {}
        # (action, tags) → hashes; "readd": tags tagd itself removed, past their deletion record
        groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for fs, desired, digest, p in batch:
            report.checked += 1
            pushed = set(p.pushed) if p else set()
            retracted = set(p.retracted) if p else set()
            state = remote.get(fs.sha256)
            if state is None:
                report.unknown += 1
                settled.append(_row(_Pending(fs.file_id, digest, pushed, retracted, 0), False, now))
                continue
            present, deleted = state
            plan = plan_file(desired, present, deleted, pushed, retracted, cfg.retract)
            report.kept_deleted += plan.kept_deleted
            calls = 0
            for action, tags in (("add", plan.add), ("readd", plan.readd), ("remove", plan.remove)):
                if tags:
                    groups.setdefault((action, tuple(tags)), []).append(fs.sha256)
                    calls += 1
            if plan.add or plan.readd:
                report.files_updated += 1
                report.tags_added += len(plan.add) + len(plan.readd)
                if dry_run:
                    report.planned[fs.sha256] = [*plan.add, *plan.readd]
            report.tags_removed += len(plan.remove)
            record = _Pending(fs.file_id, digest, pushed, retracted, calls)
            if calls:
                pending[fs.sha256] = record
            else:
                settled.append(_row(record, True, now))
        if dry_run:
            if progress:
                progress(report.considered, total)
            continue
        if settled:
            hydrus_state.save(conn, service_key, settled)
        for (action, group_tags), hashes in groups.items():
            if action == "remove":
                client.delete_tags(hashes, service_key, group_tags)
            else:
                client.add_tags(hashes, service_key, group_tags, override_deleted=action == "readd")
            rows = []
            sent = set(group_tags)
            for sha in hashes:
                rec = pending[sha]
                if action == "remove":
                    rec.pushed -= sent
                    rec.retracted |= sent
                else:
                    rec.pushed |= sent
                    rec.retracted -= sent
                rec.calls_left -= 1
                rows.append(_row(rec, True, now))
            hydrus_state.save(conn, service_key, rows)
        if progress:
            progress(report.considered, total)
    log.info("%s", report.line())
    return report
