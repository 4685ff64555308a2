"""Probe taggers with the published I/O of the #13 families (PixAI, cl_tagger, animetimm,
Camie v2), whose outputs reveal what tagd fed them.

features f = [band c0, c1, c2 | centre c0, c1, c2]: per-channel means over the top 8 rows
(letterbox pad for padded families) and over the central 8x8 block. H and W may be dynamic.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_graph

N_TAGS = 6


def _probe_nodes(x: str) -> tuple[list, list]:
    """Nodes computing `feat` [N, 6] from NCHW input `x` of any height and width."""
    c = lambda name, v: numpy_helper.from_array(np.asarray(v, dtype=np.int64), name)  # noqa: E731
    inits = [
        c("zero", [0]),
        c("eight", [8]),
        c("axis_h", [2]),
        c("axes_hw", [2, 3]),
        c("hw_idx", [2, 3]),
        c("two", [2]),
        c("four", [4]),
    ]
    nodes = [
        helper.make_node("Slice", [x, "zero", "eight", "axis_h"], ["band"]),
        helper.make_node("ReduceMean", ["band"], ["band_mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Shape", [x], ["shape"]),
        helper.make_node("Gather", ["shape", "hw_idx"], ["hw"], axis=0),
        helper.make_node("Div", ["hw", "two"], ["half"]),
        helper.make_node("Sub", ["half", "four"], ["start"]),
        helper.make_node("Add", ["start", "eight"], ["end"]),
        helper.make_node("Slice", [x, "start", "end", "axes_hw"], ["centre"]),
        helper.make_node("ReduceMean", ["centre"], ["centre_mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Concat", ["band_mean", "centre_mean"], ["feat"], axis=1),
    ]
    return nodes, inits


def build_probe(
    path: Path,
    *,
    outputs: str,
    input_name: str = "input",
    size: int | None = None,
    float16: bool = False,
) -> Path:
    """outputs: "deepghs" = [embedding, logits, prediction] (prediction = sigmoid(feat));
    "logits" = one output, feat as logits; "camie" = [initial, refined], refined = feat."""
    hw: list[int | str] = [size, size] if size else ["height", "width"]
    dtype = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    x = helper.make_tensor_value_info(input_name, dtype, ["batch", 3, *hw])
    nodes, inits = [], []
    src = input_name
    if float16:
        nodes.append(helper.make_node("Cast", [input_name], ["x32"], to=TensorProto.FLOAT))
        src = "x32"
    probe, probe_inits = _probe_nodes(src)
    nodes += probe
    inits += probe_inits
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", N_TAGS])  # noqa: E731
    if outputs == "deepghs":
        inits += [
            numpy_helper.from_array(np.eye(N_TAGS, dtype=np.float32), "head_w"),
            numpy_helper.from_array(np.zeros(N_TAGS, np.float32), "head_b"),
        ]
        nodes += [
            helper.make_node("Identity", ["feat"], ["embedding"]),
            helper.make_node("MatMul", ["embedding", "head_w"], ["mm"]),
            helper.make_node("Add", ["mm", "head_b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["prediction"]),
        ]
        outs = [out("embedding"), out("logits"), out("prediction")]
    elif outputs == "logits":
        # 16 KiB of weights that add 0: big enough to be stored as external data.
        inits += [
            numpy_helper.from_array(np.ones(4096, np.float32), "ballast"),
            numpy_helper.from_array(np.float32(0.0), "nothing"),
        ]
        nodes += [
            helper.make_node("ReduceSum", ["ballast"], ["ballast_sum"], keepdims=0),
            helper.make_node("Mul", ["ballast_sum", "nothing"], ["zero_f"]),
            helper.make_node("Add", ["feat", "zero_f"], ["output"]),
        ]
        outs = [out("output")]
    elif outputs == "camie":
        inits.append(numpy_helper.from_array(np.float32(7.0), "seven"))
        nodes += [
            helper.make_node("Mul", ["feat", "seven"], ["initial_predictions"]),
            helper.make_node("Identity", ["feat"], ["refined_predictions"]),
        ]
        outs = [out("initial_predictions"), out("refined_predictions")]
    else:
        raise ValueError(outputs)
    return save_graph(path, helper.make_graph(nodes, "probe", [x], outs, inits))


def write_selected_tags(
    path: Path, rows: list[tuple[str, int]], best: list[float | None] | None = None
) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "category", "count", *(["best_threshold"] if best else [])])
        for i, (name, cat) in enumerate(rows):
            extra = [] if not best else ["" if best[i] is None else best[i]]
            w.writerow([name, cat, 0, *extra])
    return path


def pixai_folder(folder: Path, *, preprocess: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_probe(folder / "model.onnx", outputs="deepghs", size=448)
    write_selected_tags(
        folder / "selected_tags.csv",
        [(f"g{i}", 0) for i in range(3)] + [(f"c{i}", 4) for i in range(3)],
    )
    if preprocess:
        stages = [
            {"type": "resize", "size": [448, 448], "interpolation": "bilinear"},
            {"type": "to_tensor"},
            {"type": "normalize", "mean": [0.5] * 3, "std": [0.5] * 3},
        ]
        (folder / "preprocess.json").write_text(json.dumps({"stages": stages}))
    return folder


def animetimm_folder(
    folder: Path,
    size: int = 384,
    mean: tuple = (0.485, 0.456, 0.406),
    std: tuple = (0.229, 0.224, 0.225),
    best: list[float | None] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_probe(folder / "model.onnx", outputs="deepghs")
    rows = [("g0", 0), ("g1", 0), ("g2", 0), ("general", 9), ("sensitive", 9), ("c0", 4)]
    write_selected_tags(folder / "selected_tags.csv", rows, best)
    test = [
        {
            "type": "pad_to_size",
            "size": [512, 512],
            "background_color": "white",
            "interpolation": "bilinear",
        },
        {"type": "resize", "size": size, "interpolation": "bicubic"},
        {"type": "center_crop", "size": [size, size]},
        {"type": "maybe_to_tensor"},
        {"type": "normalize", "mean": list(mean), "std": list(std)},
    ]
    (folder / "preprocess.json").write_text(json.dumps({"test": test, "val": test}))
    return folder


CL_CATEGORIES = ["General", "Character", "Rating", "Rating", "Quality", "Quality"]


def cl_tagger_folder(folder: Path, *, float16: bool = False, space_format: bool = False) -> Path:
    sub = folder / "cl_tagger_1_0x"
    sub.mkdir(parents=True, exist_ok=True)
    build_probe(
        sub / "model.onnx", outputs="logits", input_name="input_image", size=448, float16=float16
    )
    tags = ["long_hair", "hero", "general", "explicit", "best_quality", "worst_quality"]
    if space_format:
        mapping: dict = {
            "idx_to_tag": {str(i): t for i, t in enumerate(tags)},
            "tag_to_category": dict(zip(tags, CL_CATEGORIES, strict=True)),
        }
    else:
        mapping = {
            str(i): {"tag": t, "category": c}
            for i, (t, c) in enumerate(zip(tags, CL_CATEGORIES, strict=True))
        }
    (sub / "tag_mapping.json").write_text(json.dumps(mapping))
    return folder


def camie_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    build_probe(folder / "camie-tagger-v2.onnx", outputs="camie", size=512)
    tags = ["g0", "miku", "vocaloid", "some_artist", "rating_general", "year_2020"]
    cats = ["general", "character", "copyright", "artist", "rating", "year"]
    meta = {
        "dataset_info": {
            "total_tags": N_TAGS,
            "tag_mapping": {
                "idx_to_tag": {str(i): t for i, t in enumerate(tags)},
                "tag_to_category": dict(zip(tags, cats, strict=True)),
            },
        },
        "model_info": {"img_size": 512},
    }
    (folder / "camie-tagger-v2-metadata.json").write_text(json.dumps(meta))
    return folder


def write_thresholds_csv(
    folder: Path, rows: list[tuple[int, str, float]], *, metrics: bool
) -> Path:
    """deepghs `thresholds.csv`: PixAI's `category,name,threshold`; animetimm's adds alpha
    and the validation metrics after the threshold."""
    with open(folder / "thresholds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        extra = ["f1", "precision", "recall"] if metrics else []
        w.writerow(["category", "name", *(["alpha"] if metrics else []), "threshold", *extra])
        for cat, name, value in rows:
            w.writerow([cat, name, *([0.5] if metrics else []), value, *([0.6] * len(extra))])
    return folder / "thresholds.csv"
