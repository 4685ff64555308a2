"""Sidecar files next to images: Hydrus `.jpg.txt`, kohya `.txt` captions, JSON with scores.

Formatting is pure; `write_sidecar` writes atomically and never replaces a sidecar tagd did
not write itself (the `sidecars` table remembers the hash of what tagd wrote) unless asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from tagd.config import DEFAULT_NAMESPACES
from tagd.index import sidecars as sidecar_rows
from tagd.index.atomic import write_atomic
from tagd.names import json_path
from tagd.tagtext import escape_parentheses, hydrus_tag, with_spaces, with_underscores

STYLES = ("hydrus", "kohya", "json")
NAMESPACE_ORDER = ("rating", "character", "copyright", "artist", "general", "meta")

Tags = Mapping[tuple[str, str], float]  # (namespace, name) → score


@dataclass(frozen=True)
class KohyaOptions:
    spaces: bool = True
    escape: bool = True
    rating: bool = False
    exclude: Collection[str] = ()


def _ordered(tags: Tags) -> list[tuple[str, str, float]]:
    def key(item: tuple[tuple[str, str], float]) -> tuple[int, float, str]:
        (ns, name), score = item
        rank = NAMESPACE_ORDER.index(ns) if ns in NAMESPACE_ORDER else len(NAMESPACE_ORDER)
        return (rank, -score, name)

    return [(ns, name, score) for (ns, name), score in sorted(tags.items(), key=key)]


def hydrus_text(tags: Tags) -> str:
    """One Hydrus tag per line, with namespaces, as Hydrus's sidecar import reads them."""
    lines = [
        hydrus_tag(ns, name, DEFAULT_NAMESPACES, "{tag}") or with_spaces(name).lower()
        for ns, name, _ in _ordered(tags)
    ]
    return "".join(line + "\n" for line in lines)


def kohya_text(tags: Tags, options: KohyaOptions = KohyaOptions()) -> str:
    """A comma-separated caption: rating (if wanted) and characters first, then by score."""
    excluded = {with_underscores(t) for t in options.exclude}
    words = []
    for ns, name, _ in _ordered(tags):
        if (ns == "rating" and not options.rating) or name in excluded:
            continue
        text = with_spaces(name) if options.spaces else name
        words.append(escape_parentheses(text) if options.escape else text)
    return ", ".join(words) + "\n"


def json_text(path: str, sha256: str, tags: Tags) -> str:
    """`path_b64` (the exact bytes) is added for a name that is not UTF-8."""
    by_ns: dict[str, dict[str, float]] = {}
    for ns, name, score in _ordered(tags):
        by_ns.setdefault(ns, {})[name] = round(score, 4)
    record = {**json_path(path), "sha256": sha256, "tags": by_ns}
    return json.dumps(record, ensure_ascii=False) + "\n"


def sidecar_path(image: str, style: str) -> Path:
    p = Path(image)
    if style == "kohya":
        return p.with_suffix(".txt")
    return p.with_name(p.name + (".json" if style == "json" else ".txt"))


def render(style: str, path: str, sha256: str, tags: Tags, kohya: KohyaOptions) -> str:
    if style == "hydrus":
        return hydrus_text(tags)
    if style == "kohya":
        return kohya_text(tags, kohya)
    return json_text(path, sha256, tags)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sidecar_mode(image: Path | None) -> int:
    """Read/write bits no more open than the image's (a private image keeps a private
    sidecar), never executable; write_atomic applies the umask on top."""
    if image is None:
        return 0o666
    try:
        return 0o666 & os.stat(image).st_mode
    except OSError:
        return 0o600


def write_sidecar(
    conn: sqlite3.Connection,
    target: Path,
    text: str,
    *,
    overwrite: bool = False,
    image: Path | None = None,
) -> str:
    """'written', 'unchanged', or 'kept' (an existing sidecar tagd did not write). The
    sidecar's mode follows the umask and is never more open than `image`'s."""
    data = text.encode("utf-8")
    try:
        existing = target.read_bytes()
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if existing == data:
            return "unchanged"
        ours = sidecar_rows.written_sha(conn, str(target))
        if not overwrite and (ours is None or ours != _sha(existing)):
            return "kept"
    write_atomic(target, lambda fh: fh.write(data), mode=sidecar_mode(image), durable=True)
    sidecar_rows.record_written(conn, str(target), _sha(data))
    return "written"
