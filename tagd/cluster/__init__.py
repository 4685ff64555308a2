"""Tagging on a Ray cluster (`cluster:` in the config).

This package's top level never imports ray: `tagd scan` and `tagd run` ask `pipeline_for()`
for their pipeline, and only a config with `cluster:` loads the coordinator and Ray.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tagd.tagging.hub import ModelError

if TYPE_CHECKING:
    from tagd.config import Config
    from tagd.tagging.pipeline import Pipeline
    from tagd.tagging.tagger import Tagger

__all__ = ["ClusterError", "pipeline_for"]

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
