"""Which files under a watched root are gallery images tagd should look at. Pure functions."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import PurePosixPath


def excluded(rel_path: str, patterns: Iterable[str]) -> bool:
    """True when any path component (or the whole relative path) matches an exclude glob."""
    parts = PurePosixPath(rel_path).parts
    for pattern in patterns:
        if fnmatch.fnmatchcase(rel_path, pattern):
            return True
        if any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def wanted(
    rel_path: str,
    *,
    extensions: Iterable[str],
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
) -> bool:
    """An image file by extension, inside the include globs (if any), outside the excludes."""
    name = PurePosixPath(rel_path).name
    if not name.lower().endswith(tuple(extensions)):
        return False
    if excluded(rel_path, exclude):
        return False
    include = tuple(include)
    if not include:
        return True
    return any(fnmatch.fnmatchcase(rel_path, p) or fnmatch.fnmatchcase(name, p) for p in include)
