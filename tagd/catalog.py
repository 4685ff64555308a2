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
    # Pinned commit where one was verified; "main" otherwise (the note says so).
    revision: str = "main"


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
    # #13 families. Only cl_tagger's commit was found in the sources read; the others follow
    # "main" until a commit is pinned in the config (`revision:`).
    "pixai-tagger-v0.9": Entry(
        "deepghs/pixai-tagger-v0.9-onnx", "pixai", "PixAI v0.9 (ONNX by deepghs), revision main"
    ),
    "cl-tagger-1.0x": Entry(
        "cella110n/cl_tagger",
        "cl-tagger",
        "cl_tagger v1.0x (cl_tagger_1_0x/), pinned",
        "0b6e9b4e145b1423bfd1715119074a24a301b471",
    ),
    "camie-tagger-v2": Entry(
        "Camais03/camie-tagger-v2",
        "camie-v2",
        "Camie v2, GPL-3.0 weights, preprocessing unverified, revision main",
    ),
    "animetimm-caformer-b36": Entry(
        "animetimm/caformer_b36.dbv4-full", "animetimm", "animetimm CAFormer-B36, revision main"
    ),
    "animetimm-mobilenetv3": Entry(
        "animetimm/mobilenetv3_large_150d.dbv4-full-witha",
        "animetimm",
        "animetimm MobileNetV3 (small, CPU/NAS; with artists), revision main",
    ),
}


def lookup(word: str) -> Entry | None:
    return CATALOG.get(word.strip().lower())
