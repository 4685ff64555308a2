"""Label files: which tag, in which namespace, each model output column means."""

from __future__ import annotations

import csv
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
