"""Model families: how each kind of tagger must be fed and read, as declarative presets.

A preset names the files a model ships with and the preprocessing it was trained with; the
input size is read from the ONNX graph at load time where it is fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tagd.labels import READERS, Labels, read_selected_tags_csv
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

# KichangKim/DeepDanbooru load_image_for_evaluate: area resize keeping aspect, centred with
# edge-replicated padding, RGB /255, NHWC; sigmoid inside the model. The reference decodes to
# 3 channels, dropping alpha (the colour stored under transparent pixels shows), and so does
# tagd by default: the model was trained that way. `alpha_background` in a custom family
# overrides it.
DEEPDANBOORU = Family(
    name="deepdanbooru",
    model_file="model.onnx",
    label_file="tags.txt",
    read_labels=READERS["tags.txt"],
    preprocess=PreprocessSpec(
        size=(512, 512),
        layout="NHWC",
        channels="RGB",
        fit="fit-edge",
        alpha_background=None,
        resample="box",
        scale=1 / 255,
    ),
    outputs_logits=False,
    thresholds={"general": 0.5, "character": 0.5, "rating": "top"},
)

# 7eu7d7/ML-Danbooru demo.py: Image.open(...).convert("RGB") (alpha dropped), torchvision
# Resize((S, S)) (stretch, bilinear), ToTensor, no Normalize; NCHW RGB 0-1; logits. S is read
# from the graph (CAFormer 448, TResNet-D 640); 448 where the export leaves it symbolic.
ML_DANBOORU = Family(
    name="ml-danbooru",
    model_file="model.onnx",
    label_file="class.json",
    read_labels=READERS["class.json"],
    preprocess=PreprocessSpec(
        size=(448, 448),
        layout="NCHW",
        channels="RGB",
        fit="stretch",
        alpha_background=None,
        resample="bilinear",
        scale=1 / 255,
    ),
    outputs_logits=True,
    thresholds={"general": 0.7, "default": 0.7},
)

# RedRocket JTP PILOT: Fit longest side to 384 (Lanczos, upscaling), alpha on 50% grey,
# Normalize(0.5, 0.5) to [-1, 1], CenterCrop pads with 0 (= grey), NCHW RGB; logits.
JTP = Family(
    name="jtp",
    model_file="model.onnx",
    label_file="tags.json",
    read_labels=READERS["tags.json"],
    preprocess=PreprocessSpec(
        size=(384, 384),
        layout="NCHW",
        channels="RGB",
        fit="fit-tensor",
        alpha_background=(128, 128, 128),
        resample="lanczos",
        scale=1 / 255,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        tensor_pad=0.0,
    ),
    outputs_logits=True,
    thresholds={"general": 0.2, "default": 0.2},
)

FAMILIES: dict[str, Family] = {f.name: f for f in (WD14, DEEPDANBOORU, ML_DANBOORU, JTP)}

_SPEC_FIELDS = {f.name for f in fields(PreprocessSpec)}


def custom(name: str, settings: Mapping[str, Any], known: Mapping[str, Family]) -> Family:
    """A preset from the config's `families:` section: a `base` family with overrides."""
    base = known[settings.get("base", "wd14")]
    spec_changes = {k: v for k, v in settings.items() if k in _SPEC_FIELDS}
    for key in ("size", "pad_color", "alpha_background", "mean", "std"):
        if spec_changes.get(key) is not None:
            spec_changes[key] = tuple(spec_changes[key])
    label_file = settings.get("label_file", base.label_file)
    label_format = settings.get("label_format")
    reader = READERS[label_format] if label_format else READERS.get(label_file, base.read_labels)
    return Family(
        name=name,
        model_file=settings.get("model_file", base.model_file),
        label_file=label_file,
        read_labels=reader,
        preprocess=replace(base.preprocess, **spec_changes),
        outputs_logits=settings.get("outputs_logits", base.outputs_logits),
        thresholds={**base.thresholds, **settings.get("thresholds", {})},
    )


def get(name: str, extra: Mapping[str, Mapping[str, Any]] | None = None) -> Family:
    """A built-in preset or one defined under `families:` (which may build on another)."""
    known = dict(FAMILIES)
    for fname, settings in (extra or {}).items():
        known[fname] = custom(fname, settings, known)
    try:
        return known[name]
    except KeyError:
        names = ", ".join(sorted(known))
        raise KeyError(f"unknown model family {name!r} (known: {names})") from None
