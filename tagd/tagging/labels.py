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
    # Per-tag thresholds a model ships (animetimm's best_threshold); NaN where none.
    thresholds: tuple[float, ...] | None = None

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
            per_tag: list[float] = []
            has_best = "best_threshold" in header
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
                if has_best:
                    per_tag.append(_best_threshold(row.get("best_threshold"), path, line))
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path.name}: not a readable CSV file ({exc})") from exc
    if not names:
        raise LabelError(f"{path.name}: no tags listed")
    return Labels(tuple(names), tuple(namespaces), tuple(per_tag) if has_best else None)


def _best_threshold(raw: str | None, path: Path, line: int) -> float:
    """An empty cell means no per-tag threshold (NaN); anything else must be a fraction."""
    if raw is None or not raw.strip():
        return float("nan")
    try:
        value = float(raw)
    except ValueError:
        raise LabelError(f"{path.name} line {line}: best_threshold is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise LabelError(f"{path.name} line {line}: best_threshold {value} is not in 0..1")
    return value


def read_thresholds_csv(path: Path) -> dict[str, float]:
    """Per-category thresholds a deepghs export ships (`thresholds.csv`: PixAI's
    `category,name,threshold`, animetimm's with alpha/f1/precision/recall after it), as
    {namespace: threshold}. The first row of a category wins, as imgutils reads it."""
    out: dict[str, float] = {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            if "threshold" not in header or not ({"category", "name"} & set(header)):
                raise LabelError(
                    f"{path.name}: expected a header with category, name and threshold columns "
                    f"(category,name,threshold), found {','.join(header) or 'nothing'}"
                )
            for line, row in enumerate(reader, start=2):
                raw = (row.get("category") or "").strip()
                name = (row.get("name") or "").strip()
                try:
                    namespace = DANBOORU_CATEGORIES.get(int(raw), name or f"category{raw}")
                except ValueError:
                    namespace = name or raw
                if not namespace:
                    raise LabelError(f"{path.name} line {line}: no category or name")
                try:
                    value = float(row.get("threshold") or "")
                except ValueError:
                    raise LabelError(
                        f"{path.name} line {line}: threshold is not a number"
                    ) from None
                if not 0.0 <= value <= 1.0:
                    raise LabelError(f"{path.name} line {line}: threshold {value} is not in 0..1")
                out.setdefault(namespace, value)
    except OSError as exc:
        raise LabelError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path.name}: not a readable CSV file ({exc})") from exc
    return out


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


# cl_tagger's and Camie's category words → tagd namespaces. cl_tagger's "model" (which
# generator made the image) would collide with the `model:NAME` search term, and Camie's
# "year" has no namespace of its own; both go to meta.
CATEGORY_WORDS = {
    "general": "general",
    "character": "character",
    "rating": "rating",
    "artist": "artist",
    "copyright": "copyright",
    "meta": "meta",
    "quality": "quality",
    "model": "meta",
    "year": "meta",
}


def _indexed(mapping: object, path: Path, what: str) -> dict[int, object]:
    if not isinstance(mapping, dict) or not mapping:
        raise LabelError(f"{path.name}: {what} must be a non-empty object keyed by index")
    try:
        index = {int(k): v for k, v in mapping.items()}
    except ValueError:
        raise LabelError(f"{path.name}: {what} keys must be output indices (0, 1, ...)") from None
    if sorted(index) != list(range(len(index))):
        raise LabelError(f"{path.name}: {what} indices are not 0..{len(index) - 1} without gaps")
    return index


def _categorised(
    pairs: list[tuple[str, str]], path: Path, strip_rating_prefix: bool = False
) -> Labels:
    names, namespaces = [], []
    for i, (tag, category) in enumerate(pairs):
        if not isinstance(tag, str) or not tag.strip():
            raise LabelError(f"{path.name}: tag {i} has no name")
        word = str(category).strip().lower()
        ns = CATEGORY_WORDS.get(word, word or "general")
        name = tag.strip()
        if ns == "rating" and strip_rating_prefix:
            name = name.removeprefix("rating_").removeprefix("rating:")
        names.append(name)
        namespaces.append(ns)
    return Labels(tuple(names), tuple(namespaces))


def _idx_to_tag(data: dict, path: Path, strip_rating_prefix: bool) -> Labels:
    index = _indexed(data.get("idx_to_tag"), path, "idx_to_tag")
    categories = data.get("tag_to_category") or {}
    if not isinstance(categories, dict):
        raise LabelError(f"{path.name}: tag_to_category must be an object {{tag: category}}")
    pairs = [(str(index[i]), str(categories.get(index[i], "general"))) for i in range(len(index))]
    return _categorised(pairs, path, strip_rating_prefix)


def read_tag_mapping_json(path: Path) -> Labels:
    """cl_tagger's tag_mapping.json: {"<idx>": {"tag", "category"}} (the author's CLI) or
    {"idx_to_tag": {...}, "tag_to_category": {...}} (the author's Space); both are read."""
    data = _read_json(path)
    if isinstance(data, dict) and "idx_to_tag" in data:
        return _idx_to_tag(data, path, strip_rating_prefix=False)
    index = _indexed(data, path, "the mapping")
    pairs = []
    for i in range(len(index)):
        entry = index[i]
        if not isinstance(entry, dict) or "tag" not in entry:
            raise LabelError(f'{path.name} entry {i}: expected {{"tag": ..., "category": ...}}')
        pairs.append((entry["tag"], str(entry.get("category", "general"))))
    return _categorised(pairs, path)


def read_camie_metadata(path: Path) -> Labels:
    """Camie v2's metadata JSON: dataset_info.tag_mapping.{idx_to_tag, tag_to_category}
    (older files: the same two keys at the top level). Rating tags lose a `rating_` prefix
    so `rating:<=sensitive` works on them as on the other families."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise LabelError(f"{path.name}: expected a JSON object")
    info = data.get("dataset_info")
    mapping = info.get("tag_mapping") if isinstance(info, dict) else None
    if isinstance(mapping, dict) and "idx_to_tag" in mapping:
        return _idx_to_tag(mapping, path, strip_rating_prefix=True)
    if "idx_to_tag" in data:
        return _idx_to_tag(data, path, strip_rating_prefix=True)
    raise LabelError(
        f"{path.name}: no dataset_info.tag_mapping.idx_to_tag; is this Camie's metadata file?"
    )


READERS = {
    "selected_tags.csv": read_selected_tags_csv,
    "tags.txt": read_tags_txt,
    "class.json": read_class_json,
    "tags.json": read_tags_json,
    "tag_mapping.json": read_tag_mapping_json,
    "camie-metadata.json": read_camie_metadata,
}
