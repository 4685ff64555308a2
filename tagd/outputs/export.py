"""Exports of the index for other tools: CSV (one row per tag) and JSON Lines (one per file)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from typing import TextIO

from tagd.names import is_utf8, json_text, path_b64
from tagd.outputs.effective import FileTagSet

FORMATS = ("csv", "jsonl")
CSV_COLUMNS = ("path", "sha256", "model", "namespace", "tag", "score")


def write_csv(files: Iterable[FileTagSet], out: TextIO) -> int:
    """Rows as the `file_tags` view: one per (path, model, tag). Returns the number of files."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    n = 0
    for fs in files:
        n += 1
        for path in fs.paths:
            for t in fs.tags:
                writer.writerow((path, fs.sha256, t.model, t.namespace, t.name, f"{t.score:.4f}"))
    return n


def write_jsonl(files: Iterable[FileTagSet], out: TextIO) -> int:
    n = 0
    for fs in files:
        n += 1
        record: dict[str, object] = {
            "sha256": fs.sha256,
            "paths": [json_text(p) for p in fs.paths],
            "tags": [
                {
                    "model": t.model,
                    "namespace": t.namespace,
                    "tag": t.name,
                    "score": round(t.score, 4),
                }
                for t in fs.tags
            ],
        }
        if not all(is_utf8(p) for p in fs.paths):
            record["paths_b64"] = [path_b64(p) for p in fs.paths]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return n
