"""Model families: how each kind of tagger must be fed and read, as declarative presets.

A preset names the files a model ships with and the preprocessing it was trained with; the
input size is read from the ONNX graph at load time where it is fixed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tagd.tagging.labels import (
    READERS,
    LabelError,
    Labels,
    read_camie_metadata,
    read_selected_tags_csv,
    read_tag_mapping_json,
)
from tagd.tagging.preprocess import RESAMPLE, PreprocessSpec, Stage


@dataclass(frozen=True)
class Family:
    name: str
    model_file: str
    label_file: str
    read_labels: Callable[[Path], Labels]
    preprocess: PreprocessSpec
    outputs_logits: bool
    thresholds: dict[str, float | str]
    # Which graph output holds the scores: a name, or an index (-1 = the last one).
    output: str | int = 0
    # A graph output that already is the pooled embedding (deepghs exports name it).
    embedding_output: str | None = None
    # A file beside the model whose preprocessing stages replace `preprocess` when present.
    config_file: str | None = None
    # A file beside the model with per-category thresholds (deepghs `thresholds.csv`); when
    # present its values replace the preset's numbers, and the config's `thresholds:` wins.
    thresholds_file: str | None = None
    # Why a preset may not match its reference; logged at load when not empty.
    unverified: str = ""


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

# PixAI's handler.py (copied as deepghs/imgutils zoo/pixai_tagger/min_script.py): alpha on
# white, torchvision Resize((448, 448)) = a bilinear stretch, ToTensor, Normalize(0.5, 0.5),
# RGB. Its encoder is WD's EVA02, which SmilingWolf trained on BGR, but PixAI's head was fit
# on what this handler feeds, so RGB reproduces PixAI's published scores. The deepghs export
# writes these same stages to preprocess.json; when the repo has it, tagd follows that file
# (a channel swap would have to appear there as a stage, and none does). Outputs: embedding
# (1024), logits, prediction (= sigmoid(logits)).
PIXAI = Family(
    name="pixai",
    model_file="model.onnx",
    label_file="selected_tags.csv",
    read_labels=read_selected_tags_csv,
    preprocess=PreprocessSpec(
        size=(448, 448),
        layout="NCHW",
        channels="RGB",
        fit="stretch",
        alpha_background=(255, 255, 255),
        resample="bilinear",
        scale=1 / 255,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    outputs_logits=False,
    thresholds={"general": 0.30, "character": 0.85},
    output="prediction",
    embedding_output="embedding",
    config_file="preprocess.json",
    thresholds_file="thresholds.csv",
)

# cella110n's cl_tagger (celll1/tagutl onnx_predict.py, training loader in lora.py): alpha on
# white, white square pad, bicubic 448, /255, RGB→BGR, (x-0.5)/0.5, NCHW; logits. Thresholds
# are the author's Space defaults (0.55 general/meta, 0.60 character/copyright/artist);
# rating and quality are top-1 groups.
CL_TAGGER = Family(
    name="cl-tagger",
    model_file="cl_tagger_1_0x/model.onnx",
    label_file="cl_tagger_1_0x/tag_mapping.json",
    read_labels=read_tag_mapping_json,
    preprocess=PreprocessSpec(
        size=(448, 448),
        layout="NCHW",
        channels="BGR",
        fit="pad",
        pad_color=(255, 255, 255),
        alpha_background=(255, 255, 255),
        resample="bicubic",
        scale=1 / 255,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    outputs_logits=True,
    thresholds={
        "general": 0.55,
        "meta": 0.55,
        "character": 0.60,
        "copyright": 0.60,
        "artist": 0.60,
        "rating": "top",
        "quality": "top",
    },
)

# deepghs animetimm (<arch>.dbv4-full): everything but the channel order (RGB) comes from
# the repo's preprocess.json "test" stages (pad_to_size 512 white, resize, center_crop,
# normalize with the model's own mean/std); H and W are dynamic in the graph. The preset
# below is only the fallback for a local folder without preprocess.json. Per-tag
# best_threshold from selected_tags.csv is the default threshold, else 0.4.
ANIMETIMM = Family(
    name="animetimm",
    model_file="model.onnx",
    label_file="selected_tags.csv",
    read_labels=read_selected_tags_csv,
    preprocess=PreprocessSpec(
        size=(384, 384),
        layout="NCHW",
        channels="RGB",
        fit="fit-pad",
        pad_color=(255, 255, 255),
        alpha_background=(255, 255, 255),
        resample="bicubic",
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    outputs_logits=False,
    thresholds={"default": 0.4, "rating": "top"},
    output="prediction",
    embedding_output="embedding",
    config_file="preprocess.json",
    thresholds_file="thresholds.csv",
)

# Camie tagger v2. The author's utils/onnx_processing.py was not readable here; two ports
# that copy its structure line for line give: alpha dropped (convert("RGB")), Lanczos fit of
# the long side to 512, centred on the ImageNet mean colour (124, 116, 104), /255, ImageNet
# mean/std, RGB, NCHW; the last output (refined) is logits. Threshold 0.492 is the card's
# macro-optimised value as quoted by a third party.
CAMIE_V2 = Family(
    name="camie-v2",
    model_file="camie-tagger-v2.onnx",
    label_file="camie-tagger-v2-metadata.json",
    read_labels=read_camie_metadata,
    preprocess=PreprocessSpec(
        size=(512, 512),
        layout="NCHW",
        channels="RGB",
        fit="fit-pad",
        pad_color=(124, 116, 104),
        resample="lanczos",
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        alpha="drop",
    ),
    outputs_logits=True,
    thresholds={"default": 0.492, "rating": "top"},
    output=-1,
    unverified="preprocessing taken from ports of the author's app, not the author's own "
    "file; compare top tags with the author's app before relying on scores",
)

FAMILIES: dict[str, Family] = {
    f.name: f for f in (WD14, DEEPDANBOORU, ML_DANBOORU, JTP, PIXAI, CL_TAGGER, ANIMETIMM, CAMIE_V2)
}

_STAGE_RESAMPLE = frozenset(RESAMPLE)


def _hw(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value[0], value[1]
    raise LabelError(f"{where}: size must be a number or [height, width], found {value!r}")


def _colour(value: Any, where: str) -> tuple[int, int, int]:
    named = {"white": (255, 255, 255), "black": (0, 0, 0)}
    if isinstance(value, str) and value.lower() in named:
        return named[value.lower()]
    if isinstance(value, list) and len(value) in (3, 4) and all(isinstance(v, int) for v in value):
        return value[0], value[1], value[2]
    raise LabelError(f"{where}: background_color {value!r} is not white, black or [r, g, b]")


def read_preprocess_json(path: Path, base: PreprocessSpec) -> PreprocessSpec:
    """A deepghs preprocess.json (`{"stages": [...]}` for PixAI, `{"test": [...]}` for
    animetimm, imgutils stage names) as a spec: geometry stages, /255, mean/std. Channel
    order stays RGB: no stage swaps channels, and an unknown stage is an error rather than
    a silently different input."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(f"{path.name}: not a readable JSON file ({exc})") from None
    stages_raw = data.get("test", data.get("stages")) if isinstance(data, dict) else data
    if not isinstance(stages_raw, list) or not stages_raw:
        raise LabelError(f'{path.name}: expected {{"test": [stages]}} or {{"stages": [stages]}}')
    stages: list[Stage] = []
    scale, mean, std = 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    for i, st in enumerate(stages_raw):
        where = f"{path.name} stage {i}"
        kind = st.get("type") if isinstance(st, dict) else None
        interp = str(st.get("interpolation") or "bilinear").lower() if kind else "bilinear"
        if kind and interp not in _STAGE_RESAMPLE:
            raise LabelError(f"{where}: interpolation {interp!r} is not supported")
        if kind == "pad_to_size":
            w_h = _hw(st.get("size"), where)
            stages.append(
                Stage(
                    "pad_to_size",
                    size=(w_h[1], w_h[0]),
                    resample=interp,
                    background=_colour(st.get("background_color", "white"), where),
                )
            )
        elif kind == "resize":
            size = st.get("size")
            if isinstance(size, int):
                stages.append(Stage("resize", short=size, resample=interp))
            else:
                stages.append(Stage("resize", size=_hw(size, where), resample=interp))
        elif kind == "center_crop":
            stages.append(Stage("center_crop", size=_hw(st.get("size"), where)))
        elif kind in ("to_tensor", "maybe_to_tensor"):
            scale = 1 / 255
        elif kind == "normalize":
            m, s = st.get("mean"), st.get("std")
            if not (isinstance(m, list) and isinstance(s, list) and len(m) == len(s) == 3):
                raise LabelError(f"{where}: normalize needs mean and std with 3 values each")
            mean = (float(m[0]), float(m[1]), float(m[2]))
            std = (float(s[0]), float(s[1]), float(s[2]))
        else:
            raise LabelError(f"{where}: stage type {kind!r} is not supported by tagd")
    from PIL import Image

    from tagd.tagging.preprocess import run_stages

    sizes = {
        run_stages(Image.new("RGB", wh), tuple(stages)).size for wh in ((900, 500), (500, 900))
    }
    if len(sizes) != 1:
        raise LabelError(f"{path.name}: the stages do not end in one fixed size")
    (width, height) = sizes.pop()
    return replace(
        base,
        size=(height, width),
        fit="stages",
        stages=tuple(stages),
        channels="RGB",
        scale=scale,
        mean=mean,
        std=std,
    )


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
    return replace(
        base,
        name=name,
        model_file=settings.get("model_file", base.model_file),
        label_file=label_file,
        read_labels=reader,
        preprocess=replace(base.preprocess, **spec_changes),
        outputs_logits=settings.get("outputs_logits", base.outputs_logits),
        thresholds={**base.thresholds, **settings.get("thresholds", {})},
        # Preprocessing written in the config wins over a preprocess.json beside the model.
        config_file=None if spec_changes else base.config_file,
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
