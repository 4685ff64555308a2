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

from tagd.config import TagRules, VideoSettings
from tagd.index import db
from tagd.tagging import media, results, tagrules
from tagd.tagging.decode import DecodeError, FileBytes, read_file
from tagd.tagging.media import MediaInfo, frames_of
from tagd.tagging.pipeline import decode_and_prepare, register, store_file
from tagd.tagging.tagger import Tagger
from tagd.tagging.workers import draft_size


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
    memory_budget: int | None = None,
    max_file_bytes: int | None = None,
    tag_rules: TagRules | None = None,
) -> Iterator[Result]:
    """Results in input order, batch by batch; with `conn`, also stored as a scan stores them.

    `rules` (a `--threshold` override) decides what is printed; what is stored is decided by
    the model's configured thresholds, so the index never depends on how a file got there.
    Files are read here, in this process: FIFOs and devices are refused by read_file, and
    `memory_budget` (header estimate) and `max_file_bytes` bound what one file may cost.
    """
    record = None
    if conn is not None:
        with db.write(conn):
            record = register(conn, tagger, floor)
    namespaces = tagger.labels.namespaces
    # The same rules a scan applies: the config's, the imported ones, the model's own
    # per-tag thresholds.
    base_rules = tag_rules if tag_rules is not None else TagRules()
    resolved = results.resolve_rules(
        tagger.labels.names,
        namespaces,
        tagrules.effective(conn, base_rules) if conn is not None else base_rules,
        tagger.labels.thresholds,
    )
    for batch in _batches(paths, batch_size):
        ok: list[_Decoded] = []
        out: dict[str, Result] = {}
        for path in batch:
            try:
                file, w, h, fmt, tensors, info = _decode(
                    path, tagger, max_pixels, max_file_bytes=max_file_bytes, budget=memory_budget
                )
            except DecodeError as exc:
                out[path] = Result(path, None, [], exc.reason)
                continue
            except Exception as exc:
                out[path] = Result(path, None, [], f"decoder error: {type(exc).__name__}")
                continue
            ok.append(_Decoded(path, file, w, h, fmt, tensors[tagger.name], info))
        if ok:
            # Videos and animations carry several frames: aggregated per file (tagd.media).
            owner = np.concatenate([[i] * len(frames_of(d.tensor)) for i, d in enumerate(ok)])
            frame_probs, frame_embs = tagger.predict_with_embeddings(
                np.concatenate([frames_of(d.tensor) for d in ok])
            )
            agg = [
                media.aggregate(
                    frame_probs[owner == i],
                    None if frame_embs is None else frame_embs[owner == i],
                    "max",
                )
                for i in range(len(ok))
            ]
            probs = [a[0] for a in agg]
            embs = [a[1] for a in agg]
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
                        if d.media is not None:
                            media.save_info(conn, fid, d.media)
                        results.save(
                            conn,
                            file_id=fid,
                            model=record,
                            scores=row,
                            thresholds=tagger.thresholds,
                            rules=resolved,
                            floor=floor,
                            embedding=embs[i],
                        )
        for path in batch:
            yield out[path]


def _decode(
    path: str,
    tagger: Tagger,
    max_pixels: int,
    *,
    max_file_bytes: int | None,
    budget: int | None,
) -> tuple[FileBytes, int, int, str | None, dict[str, np.ndarray], MediaInfo | None]:
    """Still images as the daemon reads them; videos hashed in chunks and sampled by path,
    animations sampled from their bytes (default `video:` settings, max per tag)."""
    specs = {tagger.name: tagger.spec}
    target = draft_size([tagger.spec])
    fmt: str | None
    if media.is_video_path(path):
        file = FileBytes(b"", *media.hash_file(path))
        found = media.decode(path, specs, max_pixels, VideoSettings(), target)
    else:
        file = read_file(path, max_bytes=max_file_bytes)
        found = media.decode(file.data, specs, max_pixels, VideoSettings(), target)
    if found is not None:
        w, h, fmt, tensors, info = found
        return file, w, h, fmt, tensors, info
    w, h, fmt, tensors = decode_and_prepare(file, specs, max_pixels, budget=budget)
    return file, w, h, fmt, tensors, None


@dataclass(frozen=True)
class _Decoded:
    path: str
    file: FileBytes
    width: int
    height: int
    format: str | None
    tensor: np.ndarray
    media: MediaInfo | None = None
