"""Named shortcuts for published taggers, so a config can say `repo: wd-eva02-large-tagger-v3`.

Only repos whose layout (model.onnx + the family's label file at the top level) is known are
listed; anything else is configured with its full `owner/name` or a local `path:`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    repo: str
    family: str
    note: str


_WD_V3 = ("vit", "swinv2", "convnext", "vit-large", "eva02-large")
_WD_V2 = ("vit", "swinv2", "convnext", "convnextv2", "moat")

CATALOG: dict[str, Entry] = {
    **{
        f"wd-{arch}-tagger-v3": Entry(
            f"SmilingWolf/wd-{arch}-tagger-v3", "wd14", "WD v3, dynamic batch (ORT >= 1.17)"
        )
        for arch in _WD_V3
    },
    **{
        f"wd-v1-4-{arch}-tagger-v2": Entry(
            f"SmilingWolf/wd-v1-4-{arch}-tagger-v2",
            "wd14",
            "WD v1.4 v2" + (" (v2.1 export: dynamic batch)" if arch == "swinv2" else ", batch 1"),
        )
        for arch in _WD_V2
    },
}


def lookup(word: str) -> Entry | None:
    return CATALOG.get(word.strip().lower())
