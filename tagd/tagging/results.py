"""Turning one model's scores for one file into stored rows: threshold, blacklist, aliases.

Shared by the pipeline (fresh scores) and `tagd reindex` (stored scores or embeddings × head),
so the same decision is made either way and `selected` always reflects the tag rules.
"""

from __future__ import annotations

import fnmatch
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tagd.config import TagRules
from tagd.index import store
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
    model: store.ModelRecord,
    scores: np.ndarray,
    thresholds: Mapping[str, float | str],
    rules: Rules,
    floor: float,
    embedding: np.ndarray | None = None,
) -> None:
    """Replace one (file, model) result, alias rows and embedding included."""
    selected, targets = decide(scores, thresholds, rules)
    store.save_prediction(
        conn, file_id=file_id, model=model, scores=scores, selected=selected, floor=floor
    )
    for (ns, name), score in targets.items():
        tid = store.tag_id(conn, ns, name)
        conn.execute(
            """INSERT INTO scores(file_id, model_id, tag_id, score, selected)
               VALUES (?, ?, ?, ?, 1)
               ON CONFLICT(file_id, model_id, tag_id) DO UPDATE SET
                   selected = 1, score = max(score, excluded.score)""",
            (file_id, model.id, tid, score),
        )
    if embedding is not None:
        save_embedding(conn, file_id, model.id, embedding)


def save_embedding(
    conn: sqlite3.Connection, file_id: int, model_id: int, vector: np.ndarray
) -> None:
    """Raw pooled embedding as little-endian float16 (readers normalise)."""
    data = np.asarray(vector, dtype="<f2").tobytes()
    conn.execute(
        """INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT(file_id, model_id) DO UPDATE SET
               dim = excluded.dim, dtype = excluded.dtype, vector = excluded.vector""",
        (file_id, model_id, int(vector.shape[-1]), "float16", data),
    )


def save_head(conn: sqlite3.Connection, model: store.ModelRecord, head: Head) -> None:
    conn.execute(
        """INSERT INTO model_heads(model_id, revision, dim, n_tags, weights, bias, updated_at)
           VALUES (?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(model_id) DO UPDATE SET
               revision = excluded.revision, dim = excluded.dim, n_tags = excluded.n_tags,
               weights = excluded.weights, bias = excluded.bias,
               updated_at = excluded.updated_at""",
        (
            model.id,
            model.revision,
            head.dim,
            int(head.weights.shape[1]),
            np.asarray(head.weights, dtype="<f4").tobytes(),
            np.asarray(head.bias, dtype="<f4").tobytes(),
            time.time(),
        ),
    )


def load_head(conn: sqlite3.Connection, model_id: int) -> tuple[str | None, Head] | None:
    row = conn.execute(
        "SELECT revision, dim, n_tags, weights, bias FROM model_heads WHERE model_id = ?",
        (model_id,),
    ).fetchone()
    if row is None:
        return None
    dim, n = int(row[1]), int(row[2])
    w = np.frombuffer(row[3], dtype="<f4").reshape(dim, n).astype(np.float32)
    b = np.frombuffer(row[4], dtype="<f4").astype(np.float32)
    return row[0], Head("", w, b, True)
