"""Label files: which tag, in which namespace, each model output column means."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

# Danbooru category numbers as used by selected_tags.csv.
DANBOORU_CATEGORIES = {
    0: "general",
    1: "artist",
    3: "copyright",
    4: "character",
    5: "meta",
    9: "rating",
}


class LabelError(Exception):
    """A label file is missing, malformed, or does not match the model."""


@dataclass(frozen=True)
class Labels:
    names: tuple[str, ...]
    namespaces: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, namespace: str) -> list[int]:
        return [i for i, ns in enumerate(self.namespaces) if ns == namespace]


def read_selected_tags_csv(path: Path) -> Labels:
    """SmilingWolf's `tag_id,name,category,count`; the category picks the namespace."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if "name" not in header or "category" not in header:
                raise LabelError(
                    f"{path.name}: expected a header with name and category columns "
                    f"(tag_id,name,category,count), found {','.join(header) or 'nothing'}"
                )
            names: list[str] = []
            namespaces: list[str] = []
            for line, row in enumerate(reader, start=2):
                name = (row.get("name") or "").strip()
                try:
                    category = int(row.get("category") or "")
                except ValueError:
                    raise LabelError(f"{path.name} line {line}: category is not a number") from None
                if not name:
                    raise LabelError(f"{path.name} line {line}: empty tag name")
                names.append(name)
                namespaces.append(DANBOORU_CATEGORIES.get(category, f"category{category}"))
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path.name}: not a readable CSV file ({exc})") from exc
    if not names:
        raise LabelError(f"{path.name}: no tags listed")
    return Labels(tuple(names), tuple(namespaces))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path.name}: not UTF-8 text ({exc.reason})") from exc


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise LabelError(f"{path.name} line {exc.lineno}: invalid JSON ({exc.msg})") from exc


def _deepdanbooru_categories(folder: Path, n: int) -> list[str] | None:
    """Per-index namespace from categories.json ([{name|category, start_index}]), if present."""
    path = folder / "categories.json"
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise LabelError(f"{path.name}: expected a list of {{name, start_index}} objects")
    starts: list[tuple[int, str]] = []
    for i, d in enumerate(data):
        name, start = d.get("name", d.get("category")), d.get("start_index")
        if not isinstance(name, str) or not isinstance(start, int):
            raise LabelError(f"{path.name} entry {i}: needs a name and an integer start_index")
        starts.append((start, name.strip().lower()))
    starts.sort()
    out = ["general"] * n
    for k, (start, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else n
        for i in range(max(0, start), min(end, n)):
            out[i] = "rating" if name == "system" else name
    return out


def read_tags_txt(path: Path) -> Labels:
    """DeepDanbooru's tags.txt: one tag per line; `rating:x` lines are ratings.

    Categories come from categories.json next to it, or else from tags-character.txt.
    """
    names = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if not names:
        raise LabelError(f"{path.name}: no tags listed")
    namespaces = _deepdanbooru_categories(path.parent, len(names))
    if namespaces is None:
        chars = path.parent / "tags-character.txt"
        character = set(_read_text(chars).split()) if chars.is_file() else set()
        namespaces = ["character" if n in character else "general" for n in names]
    out_names, out_ns = [], []
    for name, ns in zip(names, namespaces, strict=True):
        if name.startswith("rating:"):
            name, ns = name.removeprefix("rating:"), "rating"
        out_names.append(name)
        out_ns.append(ns)
    return Labels(tuple(out_names), tuple(out_ns))


def read_class_json(path: Path) -> Labels:
    """ML-Danbooru's class.json: {"0": "1girl", ...}; general tags only."""
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise LabelError(f'{path.name}: expected an object {{"0": "tag", ...}}')
    try:
        index = {int(k): v for k, v in data.items()}
    except ValueError:
        raise LabelError(f"{path.name}: keys must be output indices (0, 1, ...)") from None
    if sorted(index) != list(range(len(index))):
        raise LabelError(f"{path.name}: indices are not 0..{len(index) - 1} without gaps")
    names = tuple(str(index[i]).strip() for i in range(len(index)))
    return Labels(names, ("general",) * len(names))


def read_tags_json(path: Path) -> Labels:
    """JTP's tags.json: {"tag name": index, ...} (or a list); spaces become underscores."""
    data = _read_json(path)
    if isinstance(data, list):
        ordered = [str(t) for t in data]
    elif isinstance(data, dict) and all(isinstance(v, int) for v in data.values()):
        by_index = {v: str(k) for k, v in data.items()}
        if sorted(by_index) != list(range(len(data))):
            raise LabelError(f"{path.name}: indices are not 0..{len(data) - 1} without gaps")
        ordered = [by_index[i] for i in range(len(data))]
    else:
        raise LabelError(f'{path.name}: expected {{"tag": index, ...}} or a list of tags')
    if not ordered:
        raise LabelError(f"{path.name}: no tags listed")
    names = tuple("_".join(t.strip().split()) for t in ordered)
    return Labels(names, ("general",) * len(names))


READERS = {
    "selected_tags.csv": read_selected_tags_csv,
    "tags.txt": read_tags_txt,
    "class.json": read_class_json,
    "tags.json": read_tags_json,
}
