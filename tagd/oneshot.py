"""One-shot tagging for scripts (`tagd tag`): read → decode → predict → select, no daemon.

Uses the daemon's stages (decode.read_file, pipeline.decode_and_prepare,
Tagger.predict_with_embeddings, results.decide / results.save) so a file gets the same tags
either way, and `--store` writes exactly the rows a scan writes: the configured thresholds,
blacklist and aliases decide, and the embedding is kept.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from tagd import db, results
from tagd.config import TagRules
from tagd.decode import DecodeError, FileBytes, read_file
from tagd.pipeline import decode_and_prepare, register, store_file
from tagd.tagger import Tagger


@dataclass(frozen=True)
class Result:
    path: str
    sha256: str | None
    tags: list[tuple[str, str, float]]  # (namespace, name, score), best first
    error: str | None = None


def parse_provider_options(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k=v` → pairs; a ValueError names the bad item."""
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--provider-options: {item!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def rules_with(rules: Mapping[str, float | str], threshold: float | None) -> dict[str, float | str]:
    """--threshold replaces every numeric or mcut rule; ratings stay top-1."""
    if threshold is None:
        return dict(rules)
    out: dict[str, float | str] = {k: (v if v == "top" else threshold) for k, v in rules.items()}
    out["default"] = threshold
    return out


def _batches(paths: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for p in paths:
        batch.append(p)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def tag_paths(
    tagger: Tagger,
    paths: Iterable[str],
    *,
    rules: Mapping[str, float | str],
    batch_size: int,
    max_pixels: int,
    conn: sqlite3.Connection | None = None,
    floor: float = 0.05,
    tag_rules: TagRules | None = None,
) -> Iterator[Result]:
    """Results in input order, batch by batch; with `conn`, also stored as a scan stores them.

    `rules` (a `--threshold` override) decides what is printed; what is stored is decided by
    the model's configured thresholds, so the index never depends on how a file got there.
    """
    record = None
    if conn is not None:
        with db.write(conn):
            record = register(conn, tagger, floor)
    namespaces = tagger.labels.namespaces
    resolved = results.resolve_rules(
        tagger.labels.names, namespaces, tag_rules if tag_rules is not None else TagRules()
    )
    for batch in _batches(paths, batch_size):
        ok: list[_Decoded] = []
        out: dict[str, Result] = {}
        for path in batch:
            try:
                file = read_file(path)
                w, h, fmt, tensors = decode_and_prepare(
                    file, {tagger.name: tagger.spec}, max_pixels
                )
            except DecodeError as exc:
                out[path] = Result(path, None, [], exc.reason)
                continue
            except Exception as exc:
                out[path] = Result(path, None, [], f"decoder error: {type(exc).__name__}")
                continue
            ok.append(_Decoded(path, file, w, h, fmt, tensors[tagger.name]))
        if ok:
            probs, embs = tagger.predict_with_embeddings(np.stack([d.tensor for d in ok]))
            for d, row in zip(ok, probs, strict=True):
                mask, targets = results.decide(row, rules, resolved)
                tags = [
                    (namespaces[i], tagger.labels.names[i], float(row[i]))
                    for i in np.flatnonzero(mask)
                ]
                tags += [(ns, name, score) for (ns, name), score in targets.items()]
                tags.sort(key=lambda t: -t[2])
                out[d.path] = Result(d.path, d.file.sha256, tags)
            if conn is not None and record is not None:
                with db.write(conn):
                    for i, (d, row) in enumerate(zip(ok, probs, strict=True)):
                        f = d.file
                        fid = store_file(conn, d.path, f, d.width, d.height, d.format)
                        results.save(
                            conn,
                            file_id=fid,
                            model=record,
                            scores=row,
                            thresholds=tagger.thresholds,
                            rules=resolved,
                            floor=floor,
                            embedding=None if embs is None else embs[i],
                        )
        for path in batch:
            yield out[path]


@dataclass(frozen=True)
class _Decoded:
    path: str
    file: FileBytes
    width: int
    height: int
    format: str | None
    tensor: np.ndarray
