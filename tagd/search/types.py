"""What a search is asked and what it answers: options, index look-ups, hits, errors.

Shared by the compiler, the planner and the executor, so none of them imports another for
its types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tagd.search.query import Similar

SORTS = ("score", "mtime", "path", "random")


@dataclass(frozen=True)
class Hit:
    path: str
    sha256: str | None
    tags: dict[str, float]
    file_id: int | None = None
    rank: float | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class SearchOptions:
    """What the user asked for: order and page. What the index answers about the query is
    in `Resolved`, so one request can run against any index without being rewritten."""

    sort: str = "score"
    descending: bool | None = None
    limit: int | None = None
    offset: int = 0
    with_tags: bool = False


@dataclass(frozen=True)
class Resolved:
    """What one query needs from the index, looked up once per query and passed down."""

    # Files found by each `similar:` term, with their similarity (see resolve_similar).
    similar: Mapping[Similar, dict[int, float]] = field(default_factory=dict)
    # Every model id, bound as literals so per-file probes seek the whole primary key.
    model_ids: tuple[int, ...] | None = None
    # Human verdicts exist (tagd/review.py): tag terms follow them.
    reviews: bool = False


class SearchError(Exception):
    """A well-formed query that cannot run against this index (unknown model, ...)."""
