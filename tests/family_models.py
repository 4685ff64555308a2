"""Tiny taggers with the I/O of each family (layout, head shape, logits or probabilities).

features = per-channel means of the input (3 values, in the model's channel order), then a
head: MatMul+Add or Gemm, with or without a Sigmoid; or a 1x1 Conv + GlobalAveragePool head
as in DeepDanbooru, which has no pooled vector to expose.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from onnx_models import save_graph


def head_params(n_tags: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 4, (3, n_tags)).astype(np.float32)
    b = rng.normal(0, 1, n_tags).astype(np.float32)
    return w, b


def build(
    path: Path,
    n_tags: int,
    *,
    layout: str = "NHWC",
    size: int | None = 64,
    batch: int | None = None,
    head: str = "matmul_add_sigmoid",
    reshape_fixed: bool = False,
    mix_batch: bool = False,
    input_name: str = "input",
    output_name: str = "output",
    seed: int = 0,
) -> Path:
    w, b = head_params(n_tags, seed)
    dim0: int | str = batch if batch is not None else "batch"
    hw: list[int | str] = [size, size] if size else ["height", "width"]
    shape = [dim0, *hw, 3] if layout == "NHWC" else [dim0, 3, *hw]
    axes = [1, 2] if layout == "NHWC" else [2, 3]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [dim0, n_tags])
    inits = [numpy_helper.from_array(b, "head_b")]
    nodes = [helper.make_node("ReduceMean", [input_name], ["feat0"], axes=axes, keepdims=0)]
    feat = "feat0"
    if reshape_fixed:
        inits.append(numpy_helper.from_array(np.array([1, 3], np.int64), "fixed_shape"))
        nodes.append(helper.make_node("Reshape", [feat, "fixed_shape"], ["feat1"]))
        feat = "feat1"
    if mix_batch:
        nodes += [
            helper.make_node("ReduceMean", [feat], ["bmean"], axes=[0], keepdims=1),
            helper.make_node("Add", [feat, "bmean"], ["feat_sum"]),
            helper.make_node("Mul", ["feat_sum", "half"], ["feat2"]),
        ]
        inits.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
        feat = "feat2"
    logits = "logits"
    if head in ("matmul_add_sigmoid", "matmul_add"):
        inits.append(numpy_helper.from_array(w, "head_w"))
        nodes += [
            helper.make_node("MatMul", [feat, "head_w"], ["mm"]),
            helper.make_node("Add", ["mm", "head_b"], [logits]),
        ]
    elif head in ("gemm_sigmoid", "gemm"):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T / 2), "head_wt"))
        nodes.append(
            helper.make_node("Gemm", [feat, "head_wt", "head_b"], [logits], transB=1, alpha=2.0)
        )
    elif head == "conv_gap_sigmoid":
        if layout != "NHWC":
            raise ValueError("conv_gap head is built for NHWC")
        inits.append(numpy_helper.from_array(w.T.reshape(n_tags, 3, 1, 1), "conv_w"))
        inits.append(numpy_helper.from_array(np.array([0, 3, 1, 2], np.int64), "unused"))
        nodes = [
            helper.make_node("Transpose", [input_name], ["nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["nchw", "conv_w", "head_b"], ["conv"]),
            helper.make_node("GlobalAveragePool", ["conv"], ["gap"]),
            helper.make_node("Flatten", ["gap"], [logits], axis=1),
        ]
    else:
        raise ValueError(head)
    if head.endswith("sigmoid"):
        nodes.append(helper.make_node("Sigmoid", [logits], [output_name]))
    else:
        nodes.append(helper.make_node("Identity", [logits], [output_name]))
    return save_graph(path, helper.make_graph(nodes, "family_tagger", [x], [y], inits))


def reference(tensor: np.ndarray, layout: str, n_tags: int, seed: int = 0) -> np.ndarray:
    """What the model computes for one tensor (no batch axis), as probabilities."""
    w, b = head_params(n_tags, seed)
    means = tensor.mean(axis=(0, 1) if layout == "NHWC" else (1, 2)).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-(means @ w + b)))
