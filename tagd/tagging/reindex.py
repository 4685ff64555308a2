"""Apply changed thresholds, blacklist and aliases to the whole index without decoding images.

Raising a threshold only needs the stored scores. Lowering one below the floor the scores
were stored with needs the scores that were not stored: they are recomputed from the stored
embedding × the model's head (sigmoid(e·W + b)). Files with neither are reported for a retag.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tagd.config import TagRules
from tagd.index import db, inventory, models, scores
from tagd.tagging import results
from tagd.tagging.graph import Head
from tagd.tagging.labels import Labels

CHUNK = 500


@dataclass
class Report:
    model: str
    files: int = 0
    from_scores: int = 0
    from_embeddings: int = 0
    changed_rows: int = 0
    need_retag: list[int] = field(default_factory=list)
    approximate_mcut: int = 0
    seconds: float = 0.0


def stored_labels(conn: sqlite3.Connection, model_id: int) -> tuple[Labels, np.ndarray]:
    """The model's output columns as recorded when it last ran: labels and tag ids."""
    rows = models.outputs(conn, model_id)
    labels = Labels(tuple(r[0] for r in rows), tuple(r[1] for r in rows))
    return labels, np.asarray([r[2] for r in rows], dtype=np.int64)


def model_tag_thresholds(
    conn: sqlite3.Connection, model_id: int, labels: Labels
) -> list[float] | None:
    """The per-tag thresholds the model shipped (recorded in its settings when it last ran),
    so reindex decides as tagging did."""
    try:
        found = models.settings(conn, model_id=model_id)
        values = found.get("tag_thresholds") if found is not None else None
    except ValueError:
        return None
    if not isinstance(values, list) or len(values) != len(labels):
        return None
    return [float("nan") if v is None else float(v) for v in values]


def model_file_thresholds(conn: sqlite3.Connection, name: str) -> dict[str, float]:
    """The per-category thresholds from the model's thresholds.csv, recorded when it last
    ran: reindex layers them between the family preset and the config, as tagging does."""
    try:
        found = models.settings(conn, name=name)
        values = found.get("file_thresholds") if found is not None else None
    except ValueError:
        return {}
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items() if isinstance(v, int | float)}


def lowest_threshold(namespaces: tuple[str, ...], thresholds: Mapping[str, float | str]) -> float:
    """The smallest numeric threshold any namespace of this model uses (1.0 if none)."""
    out = 1.0
    for ns in set(namespaces):
        rule = thresholds.get(ns, thresholds.get("default", results.DEFAULT_THRESHOLD))
        if not isinstance(rule, str):
            out = min(out, float(rule))
    return out


def reindex_model(
    conn: sqlite3.Connection,
    *,
    name: str,
    thresholds: Mapping[str, float | str],
    tag_rules: TagRules,
    floor: float,
    progress: Callable[[int], None] = lambda n: None,
) -> Report:
    """Recompute `selected` (and fill below-floor scores where needed) for one model."""
    start = time.perf_counter()
    report = Report(name)
    found = inventory.model_id(conn, name)
    if found is None:
        return report
    model_id = found
    labels, tag_ids = stored_labels(conn, model_id)
    col = {int(t): i for i, t in enumerate(tag_ids)}
    by_ns = results.groups(labels.namespaces)
    rules = results.resolve_rules(
        labels.names, labels.namespaces, tag_rules, model_tag_thresholds(conn, model_id, labels)
    )
    wants_mcut = any(v == "mcut" for v in thresholds.values())
    lowest = lowest_threshold(labels.namespaces, thresholds)
    head_row = results.load_head(conn, model_id)
    head = head_row[1] if head_row and head_row[1].weights.shape[1] == len(labels) else None
    record = models.ModelRecord(model_id, name, None, tag_ids)
    tag_cache: dict[tuple[str, str], int] = {}
    last = -1
    while True:
        chunk = scores.taggings_after(conn, model_id, last, CHUNK)
        if not chunk:
            break
        last = int(chunk[-1][0])
        with db.write(conn):
            _chunk(
                conn,
                chunk,
                record,
                col,
                labels,
                by_ns,
                rules,
                thresholds,
                head,
                lowest,
                wants_mcut,
                floor,
                tag_cache,
                report,
            )
        progress(len(chunk))
    _record_thresholds(conn, model_id, thresholds)
    report.seconds = time.perf_counter() - start
    return report


def _record_thresholds(
    conn: sqlite3.Connection, model_id: int, thresholds: Mapping[str, float | str]
) -> None:
    """The thresholds now applied, where `search --explain` reads them (models.settings)."""
    try:
        settings = models.settings(conn, model_id=model_id) or {}
    except ValueError:
        settings = {}
    settings["thresholds"] = dict(thresholds)
    with db.write(conn):
        models.set_settings(conn, model_id, settings)


def _chunk(
    conn: sqlite3.Connection,
    chunk: list[tuple[int, float]],
    record: models.ModelRecord,
    col: dict[int, int],
    labels: Labels,
    by_ns: dict[str, np.ndarray],
    rules: results.Rules,
    thresholds: Mapping[str, float | str],
    head: Head | None,
    lowest: float,
    wants_mcut: bool,
    floor: float,
    tag_cache: dict[tuple[str, str], int],
    report: Report,
) -> None:
    file_ids = [int(r[0]) for r in chunk]
    floors = np.asarray([float(r[1]) for r in chunk], dtype=np.float64)
    pos = {f: i for i, f in enumerate(file_ids)}
    lo, hi = file_ids[0], file_ids[-1]
    n_tags = len(labels)
    dense = np.zeros((len(file_ids), n_tags), dtype=np.float32)
    stored = np.zeros((len(file_ids), n_tags), dtype=bool)
    old: dict[int, dict[int, tuple[float, int]]] = {f: {} for f in file_ids}
    for fid, tid, score, sel in scores.scores_between(conn, record.id, lo, hi):
        if fid not in pos:
            continue
        old[fid][tid] = (score, sel)
        c = col.get(tid)
        if c is not None:
            dense[pos[fid], c] = score
            stored[pos[fid], c] = True
    needs_full = (floors > lowest) | wants_mcut
    new_floor = np.where(needs_full, np.minimum(floors, min(lowest, floor)), floors)
    from_emb = np.zeros(len(file_ids), dtype=bool)
    if head is not None and needs_full.any():
        wanted = [file_ids[i] for i in np.flatnonzero(needs_full)]
        rows = scores.embeddings_of(conn, record.id, wanted)
        if rows:
            idx = np.asarray([pos[int(r[0])] for r in rows])
            emb = np.stack([np.frombuffer(r[1], dtype="<f2") for r in rows]).astype(np.float32)
            if emb.shape[1] == head.dim:
                recomputed = head.probabilities(emb)
                dense[idx] = np.where(stored[idx], dense[idx], recomputed)
                from_emb[idx] = True
    for j in np.flatnonzero(needs_full & ~from_emb):
        if floors[j] > lowest:
            report.need_retag.append(file_ids[j])
        else:
            report.approximate_mcut += 1
        new_floor[j] = floors[j]
    selected = results.select_many(dense, by_ns, thresholds)
    selected = results.apply_per_tag(selected, dense, rules, thresholds) & ~rules.blocked
    updates: list[tuple[float, int, int, int, int]] = []
    deletes: list[tuple[int, int, int]] = []
    floor_updates: list[tuple[float, int, int]] = []
    for i, fid in enumerate(file_ids):
        targets = results.targets_of(dense[i], selected[i], rules)
        want: dict[int, tuple[float, int]] = {}
        keep = np.flatnonzero(stored[i] | selected[i] | (dense[i] >= new_floor[i]))
        for k in keep.tolist():
            want[int(record.tag_ids[k])] = (float(dense[i, k]), int(selected[i, k]))
        for target, score in targets.items():
            if target not in tag_cache:
                tag_cache[target] = models.tag_id(conn, *target)
            tid = tag_cache[target]
            prev = want.get(tid, (0.0, 0))
            want[tid] = (max(prev[0], score), 1)
        have = old[fid]
        for tid, (score, sel) in want.items():
            if have.get(tid) != (score, sel):
                updates.append((score, sel, fid, record.id, tid))
        deletes.extend((fid, record.id, tid) for tid in have if tid not in want)
        if from_emb[i]:
            report.from_embeddings += 1
            if new_floor[i] != floors[i]:
                floor_updates.append((float(new_floor[i]), fid, record.id))
        else:
            report.from_scores += 1
    scores.rewrite(conn, upserts=updates, deletes=deletes, floors=floor_updates)
    report.files += len(file_ids)
    report.changed_rows += len(updates) + len(deletes)
