"""Tiny ONNX taggers with the real I/O of the published models, built for the tests.

The probe model's outputs are simple functions of per-channel means and of the top-left pixel
of its input, so a test can tell from the stored tags whether the image was fed in BGR order,
padded with white, and scaled 0-255 - end to end, through `tagd search`.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RATINGS = ["general", "sensitive", "questionable", "explicit"]
GENERAL = ["red", "blue", "green", "white_corner", "black_corner", "bright", ">_<"]
CHARACTERS = ["crimson_knight"]


def probe_labels() -> list[tuple[str, int]]:
    """(name, Danbooru category) rows, ordered like selected_tags.csv: ratings, general, chars."""
    return [(n, 9) for n in RATINGS] + [(n, 0) for n in GENERAL] + [(n, 4) for n in CHARACTERS]


def probe_head() -> tuple[np.ndarray, np.ndarray]:
    """W [6, T], b [T] over features (mean_c0, mean_c1, mean_c2, corner_c0, corner_c1, corner_c2).

    Channel 0 is blue and channel 2 red in the model's BGR input.
    """
    names = [n for n, _ in probe_labels()]
    w = np.zeros((6, len(names)), dtype=np.float32)
    b = np.zeros(len(names), dtype=np.float32)

    def col(name: str) -> int:
        return names.index(name)

    b[col("general")] = 0.0
    b[col("sensitive")] = -2.0
    b[col("questionable")] = -4.0
    w[0, col("explicit")], w[2, col("explicit")], b[col("explicit")] = 0.1, -0.1, -20.0
    w[2, col("red")], w[0, col("red")], b[col("red")] = 0.05, -0.05, -2.0
    w[0, col("blue")], w[2, col("blue")], b[col("blue")] = 0.05, -0.05, -2.0
    w[1, col("green")], b[col("green")] = 0.05, -2.0
    w[0, col("green")] = w[2, col("green")] = -0.025
    w[3:6, col("white_corner")], b[col("white_corner")] = 0.1 / 3, -20.0
    w[3:6, col("black_corner")], b[col("black_corner")] = -0.1 / 3, 5.0
    w[0:3, col("bright")], b[col("bright")] = 0.1 / 3, -22.0
    b[col(">_<")] = -1.0
    w[2, col("crimson_knight")], w[0, col("crimson_knight")] = 0.05, -0.05
    b[col("crimson_knight")] = -2.0
    return w, b


def probe_reference(tensor: np.ndarray) -> np.ndarray:
    """What the probe model computes for one NHWC tensor [H, W, 3], in numpy."""
    w, b = probe_head()
    feats = np.concatenate([tensor.mean(axis=(0, 1)), tensor[0, 0, :]]).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-(feats @ w + b)))


def build_probe_model(
    path: Path,
    *,
    size: int = 448,
    batch: int | None = None,
    input_name: str = "input",
    output_name: str = "output",
    n_extra: int = 0,
) -> Path:
    """NHWC [batch, size, size, 3] → ReduceMean/corner features → MatMul → Add → Sigmoid."""
    w, b = probe_head()
    if n_extra:
        w = np.concatenate([w, np.zeros((6, n_extra), np.float32)], axis=1)
        b = np.concatenate([b, np.full(n_extra, -30.0, np.float32)])
    n = w.shape[1]
    dim0: int | str = batch if batch is not None else "batch"
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [dim0, size, size, 3])
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [dim0, n])
    inits = [
        numpy_helper.from_array(w, "head_w"),
        numpy_helper.from_array(b, "head_b"),
        numpy_helper.from_array(np.array([0, 0, 0], np.int64), "c_start"),
        numpy_helper.from_array(np.array([1, 1, 3], np.int64), "c_end"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "c_axes"),
    ]
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["means"], axes=[1, 2], keepdims=0),
        helper.make_node("Slice", [input_name, "c_start", "c_end", "c_axes"], ["corner4"]),
        helper.make_node("Flatten", ["corner4"], ["corner"], axis=1),
        helper.make_node("Concat", ["means", "corner"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "head_w"], ["logits_nb"]),
        helper.make_node("Add", ["logits_nb", "head_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [output_name]),
    ]
    return save_graph(path, helper.make_graph(nodes, "probe_tagger", [x], [y], inits))


def save_graph(path: Path, graph: onnx.GraphProto) -> Path:
    """Wrap a graph as an opset-17 model ONNX Runtime accepts, check it, and save it."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def write_selected_tags(path: Path, rows: list[tuple[str, int]] | None = None) -> Path:
    rows = probe_labels() if rows is None else rows
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat) in enumerate(rows):
            out.writerow([1000 + i, name, cat, 100 - i])
    return path


def build_wd_folder(folder: Path, **kwargs: object) -> Path:
    """A local model folder in SmilingWolf's layout: model.onnx + selected_tags.csv."""
    build_probe_model(folder / "model.onnx", **kwargs)  # type: ignore[arg-type]
    write_selected_tags(folder / "selected_tags.csv")
    return folder


def build_hf_cache(cache_dir: Path, repo_id: str, source: Path, *, commit: str) -> str:
    """A Hugging Face hub cache holding `source`'s files at `commit`, with refs/main → commit.

    Same layout as huggingface_hub writes (blobs + snapshot symlinks + refs), so the real
    hf_hub_download code resolves it offline.
    """
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    for f in source.iterdir():
        data = f.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(blob, snap), link)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit
