"""One-shot tagging for scripts (`tagd tag`): read → decode → predict → select, no daemon.

Uses the daemon's stages (decode.read_file, pipeline.decode_and_prepare, Tagger.predict,
thresholds.select) so a file gets the same tags either way.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from tagd import db, media, store
from tagd.config import VideoSettings
from tagd.decode import DecodeError, FileBytes, read_file
from tagd.media import frames_of
from tagd.pipeline import decode_and_prepare, register
from tagd.tagger import Tagger
from tagd.thresholds import groups, select_grouped
from tagd.workers import draft_size


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
) -> Iterator[Result]:
    """Results in input order, batch by batch; with `conn`, also stored like the pipeline does.

    Files are read here, in this process: FIFOs and devices are refused by read_file, and
    `memory_budget` (header estimate) and `max_file_bytes` bound what one file may cost."""
    record = None
    if conn is not None:
        with db.write(conn):
            record = register(conn, tagger, floor)
    namespaces = tagger.labels.namespaces
    by_ns = groups(namespaces)
    for batch in _batches(paths, batch_size):
        ok: list[_Decoded] = []
        results: dict[str, Result] = {}
        for path in batch:
            try:
                file, w, h, fmt, tensors = _decode(
                    path, tagger, max_pixels, max_file_bytes=max_file_bytes, budget=memory_budget
                )
            except DecodeError as exc:
                results[path] = Result(path, None, [], exc.reason)
                continue
            except Exception as exc:
                results[path] = Result(path, None, [], f"decoder error: {type(exc).__name__}")
                continue
            ok.append(_Decoded(path, file, w, h, fmt, tensors[tagger.name]))
        if ok:
            # Videos and animations carry several frames: aggregated per file (tagd.media).
            owner = np.concatenate([[i] * len(frames_of(d.tensor)) for i, d in enumerate(ok)])
            frame_probs = tagger.predict(np.concatenate([frames_of(d.tensor) for d in ok]))
            probs = np.stack(
                [media.aggregate(frame_probs[owner == i], None, "max")[0] for i in range(len(ok))]
            )
            masks = [select_grouped(row, by_ns, rules) for row in probs]
            for d, row, mask in zip(ok, probs, masks, strict=True):
                idx = np.flatnonzero(mask)
                idx = idx[np.argsort(-row[idx], kind="stable")]
                tags = [(namespaces[i], tagger.labels.names[i], float(row[i])) for i in idx]
                results[d.path] = Result(d.path, d.file.sha256, tags)
            if conn is not None and record is not None:
                with db.write(conn):
                    for d, row, mask in zip(ok, probs, masks, strict=True):
                        f = d.file
                        fid = store.upsert_file(conn, f.sha256, f.size, d.width, d.height, d.format)
                        store.upsert_path(conn, d.path, fid, f.size, f.mtime_ns)
                        store.save_prediction(
                            conn, file_id=fid, model=record, scores=row, selected=mask, floor=floor
                        )
        for path in batch:
            yield results[path]


def _decode(
    path: str,
    tagger: Tagger,
    max_pixels: int,
    *,
    max_file_bytes: int | None,
    budget: int | None,
) -> tuple[FileBytes, int, int, str | None, dict[str, np.ndarray]]:
    """Still images as the daemon reads them; videos hashed in chunks and sampled by path,
    animations sampled from their bytes (default `video:` settings, max per tag)."""
    specs = {tagger.name: tagger.spec}
    target = draft_size([tagger.spec])
    if media.is_video_path(path):
        file = FileBytes(b"", *media.hash_file(path))
        found = media.decode(path, specs, max_pixels, VideoSettings(), target)
    else:
        file = read_file(path, max_bytes=max_file_bytes)
        found = media.decode(file.data, specs, max_pixels, VideoSettings(), target)
    if found is not None:
        w, h, fmt, tensors, _ = found
        return file, w, h, fmt, tensors
    w, h, fmt, tensors = decode_and_prepare(file, specs, max_pixels, budget=budget)
    return file, w, h, fmt, tensors


@dataclass(frozen=True)
class _Decoded:
    path: str
    file: FileBytes
    width: int
    height: int
    format: str | None
    tensor: np.ndarray
