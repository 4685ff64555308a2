"""Model families: how each kind of tagger must be fed and read, as declarative presets.

A preset names the files a model ships with and the preprocessing it was trained with; the
input size is read from the ONNX graph at load time where it is fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tagd.labels import Labels, read_selected_tags_csv
from tagd.preprocess import PreprocessSpec


@dataclass(frozen=True)
class Family:
    name: str
    model_file: str
    label_file: str
    read_labels: Callable[[Path], Labels]
    preprocess: PreprocessSpec
    outputs_logits: bool
    thresholds: dict[str, float | str]


WD14 = Family(
    name="wd14",
    model_file="model.onnx",
    label_file="selected_tags.csv",
    read_labels=read_selected_tags_csv,
    preprocess=PreprocessSpec(
        size=(448, 448),
        layout="NHWC",
        channels="BGR",
        fit="pad",
        pad_color=(255, 255, 255),
        alpha_background=(255, 255, 255),
        resample="bicubic",
    ),
    outputs_logits=False,
    thresholds={"general": 0.35, "character": 0.85, "rating": "top"},
)

FAMILIES: dict[str, Family] = {f.name: f for f in (WD14,)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise KeyError(f"unknown model family {name!r} (known: {known})") from None
