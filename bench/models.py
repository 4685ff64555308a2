"""Random-weight ONNX stand-ins for the WD v3 taggers, for throughput benchmarks.

The real wd-vit-tagger-v3 weights are a large download that tests and CI must
not depend on, yet benchmarks are only meaningful if the graph does the same
work as the real one.  :func:`build_vit_tagger` therefore rebuilds the ViT-B/16
graph of wd-vit-tagger-v3 (448x448 NHWC input, 784 patch tokens, 12 pre-norm
blocks, global average pooling, 10861-way sigmoid head) with seeded random
weights, and :func:`build_tiny_tagger` gives a model with identical I/O whose
cost is negligible, so decode-bound pipelines can be measured in isolation.

Run ``python -m bench.models OUTDIR`` to write ``OUTDIR/vit`` and
``OUTDIR/tiny``, each with ``model.onnx`` and a matching ``selected_tags.csv``.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "N_CHARACTER_TAGS",
    "N_GENERAL_TAGS",
    "N_RATING_TAGS",
    "N_TAGS",
    "OPSET",
    "REVISION",
    "build_tiny_tagger",
    "build_vit_tagger",
    "main",
    "write_selected_tags",
]

#: Bumped whenever the builders' output changes, so cached benchmark models get rebuilt.
REVISION = 2
#: LayerNormalization needs opset >= 17; 17 keeps the models loadable by old runtimes.
OPSET = 17
#: Tag counts of wd-vit-tagger-v3's selected_tags.csv.
N_RATING_TAGS = 4
N_GENERAL_TAGS = 8106
N_CHARACTER_TAGS = 2751
N_TAGS = N_RATING_TAGS + N_GENERAL_TAGS + N_CHARACTER_TAGS  # 10861

#: protobuf refuses messages >= 2 GiB; stay well clear before switching to external data.
_SINGLE_FILE_LIMIT = 1_800_000_000
_LN_EPS = 1e-6  # timm ViT default
#: Head calibration. A real WD v3 tagger stores ~50-150 scores >= 0.05 per image and selects
#: ~10-40 at 0.35; a logit ~ N(-14, 4.7) per tag gives ~107 and ~26 of 10861. Of that spread,
#: _HEAD_IMAGE_SPREAD comes from the image (pooled features x head weights) and the rest from a
#: per-tag bias, so each image gets its own tags while the counts stay the same for both
#: models: the head weights are scaled by the pooled features' typical size, which differs
#: between the models (their RMS per feature, measured on the bench corpus through tagd's
#: preprocessing: 0.68 for the tiny model's average-pooled pixels, 0.81 for the ViT's
#: mean-pooled tokens after the final LayerNorm).
_HEAD_BIAS_MEAN = -14.0
_HEAD_BIAS_STD = 4.5
_HEAD_IMAGE_SPREAD = 1.5
_TINY_FEATURE_RMS = 0.68
_VIT_FEATURE_RMS = 0.81


class _GraphBuilder:
    """Accumulates nodes and initializers so the model code reads like the forward pass."""

    def __init__(self, rng: np.random.Generator, std: float) -> None:
        self.rng = rng
        self.std = std
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._counter = 0

    def _unique(self, name: str) -> str:
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer (weights and shape/constant tensors alike)."""
        self.inits.append(numpy_helper.from_array(value, self._unique(name)))
        return name

    def weight(self, name: str, shape: Sequence[int]) -> str:
        """Random normal weight; small std keeps 12 residual blocks numerically tame."""
        value = self.rng.standard_normal(tuple(shape), dtype=np.float32)
        value *= np.float32(self.std)
        return self.const(name, value)

    def zeros(self, name: str, shape: Sequence[int]) -> str:
        return self.const(name, np.zeros(tuple(shape), dtype=np.float32))

    def ones(self, name: str, shape: Sequence[int]) -> str:
        return self.const(name, np.ones(tuple(shape), dtype=np.float32))

    def scalar(self, name: str, value: float) -> str:
        return self.const(name, np.array(value, dtype=np.float32))

    def ints(self, name: str, values: Sequence[int]) -> str:
        return self.const(name, np.array(list(values), dtype=np.int64))

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        out: str | None = None,
        **attrs: Any,
    ) -> str:
        """Append one node and return its (single) output name."""
        self._counter += 1
        out_name = self._unique(out if out is not None else f"{op_type}_{self._counter}")
        self.nodes.append(
            helper.make_node(
                op_type,
                list(inputs),
                [out_name],
                name=f"{op_type}_{self._counter}",
                **attrs,
            )
        )
        return out_name

    def linear(self, x: str, prefix: str, d_in: int, d_out: int) -> str:
        """MatMul + Add, the form torch.onnx emits for nn.Linear on 3-D inputs."""
        w = self.weight(f"{prefix}.weight", (d_in, d_out))
        b = self.zeros(f"{prefix}.bias", (d_out,))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, prefix: str, dim: int) -> str:
        scale = self.ones(f"{prefix}.weight", (dim,))
        bias = self.zeros(f"{prefix}.bias", (dim,))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=_LN_EPS)

    def gelu(self, x: str, prefix: str) -> str:
        """Exact (erf) GELU from primitives; the Gelu op only exists from opset 20.

        onnxruntime fuses this pattern back into a single Gelu kernel.
        """
        inv_sqrt2 = self.scalar(f"{prefix}.inv_sqrt2", 1.0 / math.sqrt(2.0))
        one = self.scalar(f"{prefix}.one", 1.0)
        half = self.scalar(f"{prefix}.half", 0.5)
        erf = self.op("Erf", [self.op("Mul", [x, inv_sqrt2])])
        return self.op("Mul", [self.op("Mul", [x, self.op("Add", [erf, one])]), half])

    def head(
        self, pooled: str, d_in: int, n_tags: int, output_name: str, feature_rms: float
    ) -> str:
        """Classification head kept as exactly MatMul -> Add -> Sigmoid -> graph output.

        tagd locates the pooled embedding as the non-initializer input of this MatMul.
        `feature_rms` (the pooled features' typical RMS) sets the weights' scale so the
        stored and selected counts per image are a real tagger's (see _HEAD_BIAS_MEAN):
        post-processing and storage then cost what they cost with a real model.
        """
        w_std = _HEAD_IMAGE_SPREAD / (feature_rms * math.sqrt(d_in))
        w_value = self.rng.standard_normal((d_in, n_tags), dtype=np.float32)
        w = self.const("head.weight", w_value * np.float32(w_std))
        bias = self.rng.normal(_HEAD_BIAS_MEAN, _HEAD_BIAS_STD, n_tags).astype(np.float32)
        b = self.const("head.bias", bias)
        logits = self.op(
            "Add", [self.op("MatMul", [pooled, w], out="head.matmul"), b], out="logits"
        )
        return self.op("Sigmoid", [logits], out=output_name)

    def model(
        self,
        graph_name: str,
        inputs: Sequence[onnx.ValueInfoProto],
        outputs: Sequence[onnx.ValueInfoProto],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, list(inputs), list(outputs), self.inits)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="tagd-bench",
        )
        # Match the IR version to the opset so older onnxruntime builds still load it.
        model.ir_version = 8
        return model


def _batch_dim(batch: int | None) -> int | str:
    if batch is None:
        return "batch"
    if batch < 1:
        raise ValueError(f"batch must be >= 1 or None, got {batch}")
    return batch


def _preprocess(g: _GraphBuilder, input_name: str) -> str:
    """NHWC raw 0..255 -> NCHW in [-1, 1], as the published WD v3 exports do inside the graph."""
    nchw = g.op("Transpose", [input_name], perm=[0, 3, 1, 2])
    scaled = g.op("Mul", [nchw, g.scalar("pre.scale", 1.0 / 127.5)])
    return g.op("Sub", [scaled, g.scalar("pre.offset", 1.0)])


def _save_tagger(
    g: _GraphBuilder,
    graph_name: str,
    path: Path,
    input_name: str,
    output_name: str,
    image_size: int,
    n_tags: int,
    batch: int | None,
) -> Path:
    """Wrap the graph with a WD tagger's I/O (NHWC image in, [batch, tags] out) and save it."""
    b = _batch_dim(batch)
    image = [b, image_size, image_size, 3]
    model = g.model(
        graph_name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, image)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [b, n_tags])],
    )
    return _save(model, path)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    """Save, switching to external data only when one protobuf could not hold the model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() < _SINGLE_FILE_LIMIT:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    # The path form lets the checker handle external data and > 2 GiB models.
    onnx.checker.check_model(str(path))
    return path


def build_vit_tagger(
    path: str | Path,
    *,
    image_size: int = 448,
    patch: int = 16,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_ratio: int = 4,
    n_tags: int = N_TAGS,
    batch: int | None = None,
    input_name: str = "input",
    output_name: str = "output",
    seed: int = 0,
) -> Path:
    """Write a random-weight ViT with wd-vit-tagger-v3's graph shape and return its path.

    Defaults are ViT-B/16 at 448 px (784 tokens, ~86M backbone + ~8M head params,
    ~378 MB). Layout: Transpose(NHWC->NCHW), x/127.5-1, 16x16/16 Conv patch embed,
    learned position embedding (no CLS token), ``depth`` pre-norm blocks (LN -> MHSA
    with fused qkv -> residual, LN -> MLP(GELU) -> residual), final LN, mean over
    tokens, then MatMul -> Add -> Sigmoid into ``output_name`` of shape [batch, n_tags].
    """
    if image_size % patch:
        raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by heads {heads}")
    path = Path(path)
    grid = image_size // patch
    n_tokens = grid * grid
    head_dim = dim // heads
    hidden = dim * mlp_ratio
    g = _GraphBuilder(np.random.default_rng(seed), std=0.02)

    x = _preprocess(g, input_name)
    w_patch = g.weight("patch_embed.proj.weight", (dim, 3, patch, patch))
    b_patch = g.zeros("patch_embed.proj.bias", (dim,))
    x = g.op("Conv", [x, w_patch, b_patch], kernel_shape=[patch, patch], strides=[patch, patch])
    x = g.op("Reshape", [x, g.ints("shape.flatten_patches", (0, dim, -1))])  # [B, dim, N]
    x = g.op("Transpose", [x], perm=[0, 2, 1])  # [B, N, dim]
    x = g.op("Add", [x, g.weight("pos_embed", (1, n_tokens, dim))])

    qkv_shape = g.ints("shape.qkv", (0, 0, 3, heads, head_dim))
    merge_shape = g.ints("shape.merge_heads", (0, 0, dim))
    attn_scale = g.scalar("attn.scale", head_dim**-0.5)
    idx = [g.const(f"idx.{i}", np.array(i, dtype=np.int64)) for i in range(3)]

    for i in range(depth):
        p = f"blocks.{i}"
        # Multi-head self-attention, laid out as timm's Attention exports.
        h = g.layer_norm(x, f"{p}.norm1", dim)
        qkv = g.linear(h, f"{p}.attn.qkv", dim, 3 * dim)  # [B, N, 3*dim]
        qkv = g.op("Reshape", [qkv, qkv_shape])  # [B, N, 3, H, hd]
        qkv = g.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])  # [3, B, H, N, hd]
        q, k, v = (g.op("Gather", [qkv, idx[j]], axis=0) for j in range(3))  # [B, H, N, hd]
        q = g.op("Mul", [q, attn_scale])
        k_t = g.op("Transpose", [k], perm=[0, 1, 3, 2])  # [B, H, hd, N]
        attn = g.op("Softmax", [g.op("MatMul", [q, k_t])], axis=-1)  # [B, H, N, N]
        ctx = g.op("MatMul", [attn, v])  # [B, H, N, hd]
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])  # [B, N, H, hd]
        ctx = g.op("Reshape", [ctx, merge_shape])  # [B, N, dim]
        x = g.op("Add", [x, g.linear(ctx, f"{p}.attn.proj", dim, dim)])
        # MLP.
        h = g.layer_norm(x, f"{p}.norm2", dim)
        h = g.gelu(g.linear(h, f"{p}.mlp.fc1", dim, hidden), f"{p}.mlp.act")
        x = g.op("Add", [x, g.linear(h, f"{p}.mlp.fc2", hidden, dim)])

    x = g.layer_norm(x, "norm", dim)
    pooled = g.op("ReduceMean", [x], out="pooled", axes=[1], keepdims=0)  # [B, dim]
    g.head(pooled, dim, n_tags, output_name, _VIT_FEATURE_RMS)

    return _save_tagger(
        g, "wd_vit_tagger_v3_random", path, input_name, output_name, image_size, n_tags, batch
    )


def build_tiny_tagger(
    path: str | Path,
    *,
    image_size: int = 448,
    n_tags: int = N_TAGS,
    grid: int = 8,
    batch: int | None = None,
    input_name: str = "input",
    output_name: str = "output",
    seed: int = 0,
) -> Path:
    """Write a near-free model with the ViT's I/O, so benchmarks can isolate decode cost.

    NHWC [batch, S, S, 3] -> NCHW, x/127.5-1, AveragePool to [batch, 3, grid, grid],
    flatten to 3*grid*grid features, then the same MatMul -> Add -> Sigmoid head.
    """
    if image_size % grid:
        raise ValueError(f"image_size {image_size} is not a multiple of grid {grid}")
    path = Path(path)
    k = image_size // grid
    n_features = 3 * grid * grid
    g = _GraphBuilder(np.random.default_rng(seed), std=0.02)
    x = _preprocess(g, input_name)
    x = g.op("AveragePool", [x], kernel_shape=[k, k], strides=[k, k])  # [B, 3, grid, grid]
    pooled = g.op("Reshape", [x, g.ints("shape.flatten", (0, n_features))], out="pooled")
    g.head(pooled, n_features, n_tags, output_name, _TINY_FEATURE_RMS)

    return _save_tagger(
        g, "wd_tiny_tagger_random", path, input_name, output_name, image_size, n_tags, batch
    )


def _split_tags(n_tags: int) -> tuple[int, int]:
    """(general, character) counts: the real 8106/2751 split, scaled for other sizes."""
    if n_tags == N_TAGS:
        return N_GENERAL_TAGS, N_CHARACTER_TAGS
    if n_tags < N_RATING_TAGS:
        raise ValueError(f"n_tags must be >= {N_RATING_TAGS}, got {n_tags}")
    rest = n_tags - N_RATING_TAGS
    n_char = round(rest * N_CHARACTER_TAGS / (N_GENERAL_TAGS + N_CHARACTER_TAGS))
    return rest - n_char, n_char


def write_selected_tags(path: str | Path, n_tags: int = N_TAGS, *, seed: int = 0) -> Path:
    """Write a selected_tags.csv laid out like wd-vit-tagger-v3's.

    Columns ``tag_id,name,category,count``: 4 rating rows (category 9; tag_id 9999999
    as in the published file), then general tags (category 0), then character tags
    (category 4), counts descending within each block. Names include the parentheses,
    colons and carets real Danbooru tags have, so parsers get exercised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_general, n_char = _split_tags(n_tags)
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, str, int, int]] = []
    for name, count in zip(
        ("general", "sensitive", "questionable", "explicit"),
        (3_200_000, 2_100_000, 600_000, 450_000),
        strict=True,
    ):
        rows.append((9999999, name, 9, count))
    general_counts = np.sort(rng.integers(600, 4_000_000, n_general))[::-1]
    odd_general = (":d", "^_^", ";)", "holding_(object)", "1girl", "solo")
    for i in range(n_general):
        name = odd_general[i] if i < len(odd_general) else f"general_tag_{i:05d}"
        rows.append((100_000 + i, name, 0, int(general_counts[i])))
    char_counts = np.sort(rng.integers(50, 60_000, n_char))[::-1]
    for i in range(n_char):
        rows.append(
            (2_000_000 + i, f"character_{i:05d}_(series_{i % 97:02d})", 4, int(char_counts[i]))
        )
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("tag_id", "name", "category", "count"))
        writer.writerows(rows)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m bench.models OUTDIR`` writes model.onnx + selected_tags.csv per model."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.models OUTDIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    for sub, build in (("vit", build_vit_tagger), ("tiny", build_tiny_tagger)):
        model_path = build(out / sub / "model.onnx")
        tags_path = write_selected_tags(out / sub / "selected_tags.csv")
        size_mb = model_path.stat().st_size / 1e6
        print(f"{model_path} ({size_mb:.1f} MB), {tags_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
