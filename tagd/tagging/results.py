"""Turning one model's scores for one file into stored rows: threshold, blacklist, aliases.

Shared by the pipeline (fresh scores) and `tagd reindex` (stored scores or embeddings × head),
so the same decision is made either way and `selected` always reflects the tag rules.
"""

from __future__ import annotations

import fnmatch
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tagd.config import TagRules
from tagd.index import models
from tagd.index import scores as score_rows
from tagd.tagging.graph import Head
from tagd.tagging.thresholds import (
    DEFAULT_THRESHOLD,
    MCUT_FLOORS,
    groups,
    mcut_threshold,
    select_grouped,
)


@dataclass(frozen=True)
class Rules:
    """Tag rules resolved against one model's labels: blacklist mask, alias targets, and the
    labels' namespaces grouped once (per image that grouping would cost more than the rest)."""

    blocked: np.ndarray
    alias_of: dict[int, tuple[str, str]]
    by_ns: dict[str, np.ndarray]
    # Per-tag thresholds (config `tags.thresholds`, else the model's own); NaN = namespace rule.
    per_tag: np.ndarray | None = None
    names: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    # {tag: every tag it implies, transitively}, keys "ns:name" (tags.implications).
    implies: dict[tuple[str, str], tuple[tuple[str, str], ...]] | None = None
    # Columns with a per-tag threshold, by the set of top-1 namespaces they exclude.
    _override_idx: dict[frozenset[str], np.ndarray] = field(default_factory=dict)


def _split(tag: str, default_ns: str) -> tuple[str, str]:
    ns, _, name = tag.rpartition(":")
    return (ns or default_ns, name)


def implication_closure(
    implications: Mapping[str, str | tuple[str, ...]],
    names: Sequence[str],
    namespaces: Sequence[str],
    extra: Iterable[tuple[str, str]] = (),
) -> dict[tuple[str, str], tuple[tuple[str, str], ...]]:
    """For each tag that implies something: all it implies, following chains (cycles end).

    A key or target without a namespace means that name in the implying tag's namespace,
    as for aliases."""
    if not implications:
        return {}
    direct: dict[str, tuple[str, ...]] = {
        k: (v,) if isinstance(v, str) else tuple(v) for k, v in implications.items()
    }

    def walk(start: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        seen: list[tuple[str, str]] = []
        stack = [start]
        while stack:
            ns, name = stack.pop()
            for key in (f"{ns}:{name}", name):
                for t in direct.get(key, ()):
                    target = _split(t, ns)
                    if target != start and target not in seen:
                        seen.append(target)
                        stack.append(target)
        return tuple(seen)

    starts = {(ns, name) for name, ns in zip(names, namespaces, strict=True)} | set(extra)
    starts |= {_split(k, "general") for k in direct if ":" in k}
    out = {}
    for tag in starts:
        targets = walk(tag)
        if targets:
            out[tag] = targets
    return out


def _per_tag(
    names: Sequence[str],
    namespaces: Sequence[str],
    overrides: Mapping[str, float],
    model_thresholds: Sequence[float] | None,
) -> np.ndarray | None:
    """Threshold per output column: `ns:name`, then `name`, then the first matching glob,
    then the model's own per-tag threshold; NaN where none applies."""
    if not overrides and model_thresholds is None:
        return None
    out = np.full(len(names), np.nan, dtype=np.float32)
    if model_thresholds is not None:
        out[:] = np.asarray(model_thresholds, dtype=np.float32)
    exact = {k: v for k, v in overrides.items() if not any(c in k for c in "*?[")}
    globs = [(k, v) for k, v in overrides.items() if k not in exact]
    if not exact and not globs:
        return out
    for i, (name, ns) in enumerate(zip(names, namespaces, strict=True)):
        full = f"{ns}:{name}"
        value = exact.get(full, exact.get(name))
        if value is None:
            value = next(
                (
                    v
                    for g, v in globs
                    if fnmatch.fnmatchcase(full, g) or fnmatch.fnmatchcase(name, g)
                ),
                None,
            )
        if value is not None:
            out[i] = value
    return out


def resolve_rules(
    names: Sequence[str],
    namespaces: Sequence[str],
    rules: TagRules,
    model_thresholds: Sequence[float] | None = None,
) -> Rules:
    """Blacklist globs match `name` or `namespace:name`; alias keys likewise."""
    blocked = np.zeros(len(names), dtype=bool)
    alias_of: dict[int, tuple[str, str]] = {}
    for i, (name, ns) in enumerate(zip(names, namespaces, strict=True)):
        full = f"{ns}:{name}"
        if any(
            fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(full, g) for g in rules.blacklist
        ):
            blocked[i] = True
            continue
        target = rules.aliases.get(full, rules.aliases.get(name))
        if target is not None:
            tns, _, tname = target.rpartition(":")
            alias_of[i] = (tns or ns, tname)
    implications = getattr(rules, "implications", {}) or {}
    return Rules(
        blocked,
        alias_of,
        groups(namespaces),
        _per_tag(names, namespaces, getattr(rules, "thresholds", {}) or {}, model_thresholds),
        tuple(names),
        tuple(namespaces),
        implication_closure(implications, names, namespaces, alias_of.values()) or None,
    )


def apply_per_tag(
    mask: np.ndarray, scores: np.ndarray, rules: Rules, thresholds: Mapping[str, float | str]
) -> np.ndarray:
    """Per-tag thresholds replace the namespace rule (not in top-1 groups such as rating,
    which must keep exactly one tag). Works on one image's row or a [files, tags] matrix."""
    if rules.per_tag is None:
        return mask
    top = frozenset(
        ns for ns in rules.by_ns if thresholds.get(ns, thresholds.get("default")) == "top"
    )
    idx = rules._override_idx.get(top)
    if idx is None:
        idx = np.flatnonzero(~np.isnan(rules.per_tag))
        if top:
            idx = idx[np.asarray([rules.namespaces[i] not in top for i in idx], dtype=bool)]
        rules._override_idx[top] = idx
    if idx.size:
        mask[..., idx] = scores[..., idx] >= rules.per_tag[idx]
    return mask


def implied_targets(
    scores: np.ndarray,
    selected: np.ndarray,
    targets: dict[tuple[str, str], float],
    rules: Rules,
) -> dict[tuple[str, str], float]:
    """Adds what selected tags (and alias targets) imply to `targets`, with the implying
    score (the best one when several imply the same tag). Only adds: never unselects."""
    if not rules.implies:
        return targets
    names, namespaces = rules.names, rules.namespaces
    sources = [((namespaces[i], names[i]), float(scores[i])) for i in np.flatnonzero(selected)]
    sources += list(targets.items())
    for tag, score in sources:
        for implied in rules.implies.get(tag, ()):
            targets[implied] = max(targets.get(implied, 0.0), score)
    return targets


def select_many(
    scores: np.ndarray, by_ns: Mapping[str, np.ndarray], rules: Mapping[str, float | str]
) -> np.ndarray:
    """thresholds.select for a [files, tags] matrix at once (same rules, vectorised)."""
    mask = np.zeros(scores.shape, dtype=bool)
    rows = np.arange(scores.shape[0])
    for namespace, idx in by_ns.items():
        rule = rules.get(namespace, rules.get("default", DEFAULT_THRESHOLD))
        sub = scores[:, idx]
        if rule == "top":
            mask[rows, idx[np.argmax(sub, axis=1)]] = True
        elif rule == "mcut":
            floor = MCUT_FLOORS.get(namespace, 0.0)
            cut = np.array([max(mcut_threshold(r), floor) for r in sub], dtype=np.float32)
            mask[:, idx] = sub >= cut[:, None]
        else:
            mask[:, idx] = sub >= np.float32(rule)
    return mask


def decide(
    scores: np.ndarray, thresholds: Mapping[str, float | str], rules: Rules
) -> tuple[np.ndarray, dict[tuple[str, str], float]]:
    """(selected mask, {alias or implied target: best score}); aliased and blacklisted tags
    are unselected."""
    selected = select_grouped(scores, rules.by_ns, thresholds)
    selected = apply_per_tag(selected, scores, rules, thresholds) & ~rules.blocked
    return selected, targets_of(scores, selected, rules)


def targets_of(
    scores: np.ndarray, selected: np.ndarray, rules: Rules
) -> dict[tuple[str, str], float]:
    """Alias targets (unselecting the aliased tags in place), then everything the selected
    tags, aliased ones included, imply."""
    implied = implied_targets(scores, selected, {}, rules) if rules.implies else {}
    targets = alias_targets(scores, selected, rules)
    for tag, score in implied.items():
        targets[tag] = max(targets.get(tag, 0.0), score)
    return implied_targets(scores, selected, targets, rules) if rules.implies else targets


def alias_targets(
    scores: np.ndarray, selected: np.ndarray, rules: Rules
) -> dict[tuple[str, str], float]:
    """Moves selected aliased tags (in place) to their targets: {target: best score}."""
    targets: dict[tuple[str, str], float] = {}
    for i, target in rules.alias_of.items():
        if selected[i]:
            selected[i] = False
            targets[target] = max(targets.get(target, 0.0), float(scores[i]))
    return targets


def save(
    conn: sqlite3.Connection,
    *,
    file_id: int,
    model: models.ModelRecord,
    scores: np.ndarray,
    thresholds: Mapping[str, float | str],
    rules: Rules,
    floor: float,
    embedding: np.ndarray | None = None,
) -> None:
    """Replace one (file, model) result, alias rows and embedding included."""
    selected, targets = decide(scores, thresholds, rules)
    score_rows.save_prediction(
        conn, file_id=file_id, model=model, scores=scores, selected=selected, floor=floor
    )
    for (ns, name), score in targets.items():
        score_rows.add_alias_score(conn, file_id, model.id, models.tag_id(conn, ns, name), score)
    if embedding is not None:
        save_embedding(conn, file_id, model.id, embedding)


def save_embedding(
    conn: sqlite3.Connection, file_id: int, model_id: int, vector: np.ndarray
) -> None:
    """Raw pooled embedding as little-endian float16 (readers normalise)."""
    data = np.asarray(vector, dtype="<f2").tobytes()
    score_rows.save_embedding(conn, file_id, model_id, int(vector.shape[-1]), "float16", data)


def save_head(conn: sqlite3.Connection, model: models.ModelRecord, head: Head) -> None:
    """The head as little-endian float32, so reindex can recompute scores below the floor."""
    models.save_head(
        conn,
        model.id,
        models.StoredHead(
            model.revision,
            head.dim,
            int(head.weights.shape[1]),
            np.asarray(head.weights, dtype="<f4").tobytes(),
            np.asarray(head.bias, dtype="<f4").tobytes(),
        ),
    )


def load_head(conn: sqlite3.Connection, model_id: int) -> tuple[str | None, Head] | None:
    stored = models.load_head(conn, model_id)
    if stored is None:
        return None
    w = np.frombuffer(stored.weights, dtype="<f4").reshape(stored.dim, stored.n_tags)
    b = np.frombuffer(stored.bias, dtype="<f4").astype(np.float32)
    return stored.revision, Head("", w.astype(np.float32), b, True)
