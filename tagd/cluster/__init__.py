"""Tagging on a Ray cluster (`cluster:` in the config).

This package's top level never imports ray: `tagd scan` and `tagd run` ask `pipeline_for()`
for their pipeline, and only a config with `cluster:` loads the coordinator and Ray.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tagd.tagging.hub import ModelError

if TYPE_CHECKING:
    from tagd.config import Config
    from tagd.tagging.pipeline import Pipeline
    from tagd.tagging.tagger import Tagger

__all__ = ["ClusterError", "pipeline_for", "survey"]

STATE_KEY = "cluster"


class ClusterError(ModelError):
    """The cluster cannot tag (unreachable, no worker could load the models, all gone)."""


def pipeline_for(
    conn: sqlite3.Connection,
    config: Config,
    taggers: Sequence[Tagger],
    *,
    owner: str | None = None,
) -> Pipeline:
    """The local pipeline, or the cluster coordinator when `cluster:` is configured."""
    if config.cluster is None:
        from tagd.tagging.pipeline import Pipeline

        return Pipeline(conn, config, taggers, owner=owner)
    try:
        from tagd.cluster.coordinator import ClusterPipeline
    except ImportError as exc:
        raise ClusterError(
            f"cluster: needs Ray, which is not installed ({exc}); install it with "
            "pip install 'tagd[ray]', or remove `cluster:` from the config"
        ) from None
    return ClusterPipeline(conn, config, taggers, owner=owner)


def survey(address: str) -> dict[str, Any]:
    """The cluster's live nodes (see `ray_backend.survey`); ClusterError with one line and
    its fix when Ray is missing, nothing answers, or the versions differ."""
    try:
        from tagd.cluster import ray_backend as rb
    except ImportError as exc:
        raise ClusterError(
            f"Ray is not installed ({exc}); install it with pip install 'tagd[ray]'"
        ) from None
    try:
        return rb.survey(address)
    except ConnectionError as exc:
        reason = str(exc)
        if reason.startswith("version mismatch"):
            raise ClusterError(reason) from None
        raise ClusterError(
            f"not reachable: {reason}; start it with `ray start --head` on the "
            "head machine, check the address and the firewall, or use address: local"
        ) from None
