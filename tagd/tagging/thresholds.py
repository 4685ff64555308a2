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


def groups(namespaces: Sequence[str]) -> dict[str, np.ndarray]:
    """{namespace: its output indices}, in sorted namespace order.

    Computed once per model: grouping 10k label strings costs more than selecting from them.
    """
    ns = np.asarray(namespaces)
    return {str(n): np.flatnonzero(ns == n) for n in np.unique(ns)}


def select(
    scores: np.ndarray,
    namespaces: Sequence[str],
    rules: Mapping[str, float | str],
) -> np.ndarray:
    """Boolean mask over one image's scores.

    `rules` maps a namespace to a threshold (score >= t), "top" (only the best-scoring tag of
    that namespace) or "mcut". Namespaces without a rule use rules["default"] or 0.35.
    """
    return select_grouped(scores, groups(namespaces), rules)


def select_grouped(
    scores: np.ndarray,
    by_ns: Mapping[str, np.ndarray],
    rules: Mapping[str, float | str],
) -> np.ndarray:
    """`select` with the namespaces already grouped (see `groups`)."""
    scores = np.asarray(scores, dtype=np.float32)
    mask = np.zeros(scores.shape, dtype=bool)
    for namespace, idx in by_ns.items():
        rule = rules.get(namespace, rules.get("default", DEFAULT_THRESHOLD))
        sub = scores[idx]
        if rule == "top":
            mask[idx[int(np.argmax(sub))]] = True
            continue
        if rule == "mcut":
            threshold = max(mcut_threshold(sub), MCUT_FLOORS.get(namespace, 0.0))
        else:
            threshold = float(rule)
        mask[idx] = sub >= threshold
    return mask
