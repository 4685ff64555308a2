"""Which scores become tags: per-namespace thresholds, top-1 for ratings, and MCut. Pure numpy.

Kept apart from inference so `reindex` can re-run the same decision on stored scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# The reference (SmilingWolf's Space, deepghs/imgutils) floors MCut for characters at 0.15.
MCUT_FLOORS = {"character": 0.15}
DEFAULT_THRESHOLD = 0.35


def mcut_threshold(probs: np.ndarray) -> float:
    """Midpoint of the largest gap between consecutive sorted probabilities."""
    if probs.size < 2:
        return float(probs[0]) if probs.size else 1.0
    s = np.sort(probs)[::-1]
    gaps = s[:-1] - s[1:]
    t = int(np.argmax(gaps))
    return float((s[t] + s[t + 1]) / 2)


def select(
    scores: np.ndarray,
    namespaces: Sequence[str],
    rules: Mapping[str, float | str],
) -> np.ndarray:
    """Boolean mask over one image's scores.

    `rules` maps a namespace to a threshold (score >= t), "top" (only the best-scoring tag of
    that namespace) or "mcut". Namespaces without a rule use rules["default"] or 0.35.
    """
    scores = np.asarray(scores, dtype=np.float32)
    ns = np.asarray(namespaces)
    mask = np.zeros(scores.shape, dtype=bool)
    for namespace in np.unique(ns):
        idx = np.flatnonzero(ns == namespace)
        rule = rules.get(str(namespace), rules.get("default", DEFAULT_THRESHOLD))
        sub = scores[idx]
        if rule == "top":
            mask[idx[int(np.argmax(sub))]] = True
            continue
        if rule == "mcut":
            threshold = max(mcut_threshold(sub), MCUT_FLOORS.get(str(namespace), 0.0))
        else:
            threshold = float(rule)
        mask[idx] = sub >= threshold
    return mask
