"""Tests for the benchmark helpers: random ViT/tiny taggers and the image corpus.

The full-size ViT takes too long for the suite, so the ViT is built in a tiny
configuration with the same graph shape.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

# Runnable without a conftest or an installed package: make the repo root importable.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bench.corpus import build_corpus, plan_corpus  # noqa: E402
from bench.models import (  # noqa: E402
    N_TAGS,
    build_tiny_tagger,
    build_vit_tagger,
    write_selected_tags,
)

SMALL_VIT = {"image_size": 64, "patch": 16, "dim": 32, "depth": 2, "heads": 2, "n_tags": 50}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def small_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vit_tagger(tmp_path_factory.mktemp("vit") / "model.onnx", **SMALL_VIT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tagger(
        tmp_path_factory.mktemp("tiny") / "model.onnx", image_size=64, n_tags=50
    )


def _assert_head(path: Path, output_name: str = "output") -> None:
    """Output <- Sigmoid <- Add(., initializer) <- MatMul(non-initializer, initializer)."""
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    assert [o.name for o in graph.output] == [output_name]
    sigmoid = producer[output_name]
    assert sigmoid.op_type == "Sigmoid"
    add = producer[sigmoid.input[0]]
    assert add.op_type == "Add"
    matmul_in = [i for i in add.input if i not in inits]
    assert len(matmul_in) == 1 and any(i in inits for i in add.input)
    matmul = producer[matmul_in[0]]
    assert matmul.op_type == "MatMul"
    embedding = [i for i in matmul.input if i not in inits]
    assert len(embedding) == 1 and embedding[0] in producer
    (weight,) = [t for t in graph.initializer if t.name in matmul.input]
    assert weight.dims[-1] == model.graph.output[0].type.tensor_type.shape.dim[1].dim_value


@pytest.mark.parametrize("which", ["small_vit", "tiny"])
def test_model_passes_checker_and_has_nhwc_io(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    onnx.checker.check_model(str(path))
    graph = onnx.load(str(path)).graph
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.name == "input"
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("which", ["small_vit", "tiny"])
def test_runs_batch_1_and_3_consistently(which: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(which)
    sess = _session(path)
    x = _images(3, 64)
    y3 = sess.run(["output"], {"input": x})[0]
    assert y3.shape == (3, 50)
    assert y3.dtype == np.float32
    # Most tags sit far below any threshold, where a float32 Sigmoid rounds to exactly 0.
    assert np.all((y3 >= 0) & (y3 < 1)) and np.all(y3.max(axis=1) > 0)
    singles = [sess.run(["output"], {"input": x[i : i + 1]})[0] for i in range(3)]
    assert all(s.shape == (1, 50) for s in singles)
    np.testing.assert_allclose(y3, np.concatenate(singles), atol=1e-5, rtol=0)
    # Different images must give different outputs, or the benchmark measures nothing.
    assert not np.allclose(y3[0], y3[1])


@pytest.mark.parametrize("which", ["small_vit", "tiny"])
def test_head_is_matmul_add_sigmoid(which: str, request: pytest.FixtureRequest) -> None:
    _assert_head(request.getfixturevalue(which))


def test_vit_structure_matches_config(small_vit: Path) -> None:
    graph = onnx.load(str(small_vit)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("LayerNormalization") == 2 * SMALL_VIT["depth"] + 1
    assert ops.count("Softmax") == SMALL_VIT["depth"]
    assert ops.count("Conv") == 1
    assert graph.node[0].op_type == "Transpose"
    pos = next(t for t in graph.initializer if t.name == "pos_embed")
    grid = SMALL_VIT["image_size"] // SMALL_VIT["patch"]
    assert list(pos.dims) == [1, grid * grid, SMALL_VIT["dim"]]  # no CLS token


def test_fixed_batch_and_custom_names(tmp_path: Path) -> None:
    path = build_vit_tagger(
        tmp_path / "m.onnx", **SMALL_VIT, batch=2, input_name="pixels", output_name="probs"
    )
    _assert_head(path, "probs")
    y = _session(path).run(["probs"], {"pixels": _images(2, 64)})[0]
    assert y.shape == (2, 50)


def test_seed_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_tagger(tmp_path / "a.onnx", image_size=64, n_tags=50, seed=3)
    b = build_tiny_tagger(tmp_path / "b.onnx", image_size=64, n_tags=50, seed=3)
    assert a.read_bytes() == b.read_bytes()


def test_selected_tags_layout(tmp_path: Path) -> None:
    path = write_selected_tags(tmp_path / "selected_tags.csv")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    assert len(rows) == N_TAGS == 10861
    cats = [r["category"] for r in rows]
    assert [r["name"] for r in rows[:4]] == ["general", "sensitive", "questionable", "explicit"]
    assert cats == ["9"] * 4 + ["0"] * 8106 + ["4"] * 2751
    assert len({r["name"] for r in rows}) == len(rows)


def test_corpus_default_plan_sizes() -> None:
    specs = plan_corpus(200)
    assert all(1e6 <= s.width * s.height <= 9e6 for s in specs)
    formats = [s.format for s in specs]
    assert formats.count("JPEG") > formats.count("PNG") > 0 and formats.count("WEBP") > 0
    assert len({round(s.width / s.height, 2) for s in specs}) >= 5


def test_corpus_writes_openable_images(tmp_path: Path) -> None:
    mp = (0.05, 0.2)
    paths = build_corpus(tmp_path, 6, megapixels=mp)
    specs = plan_corpus(6, megapixels=mp)
    assert [p.name for p in paths] == [s.filename for s in specs]
    seen: set[str] = set()
    for path, spec in zip(paths, specs, strict=True):
        with Image.open(path) as im:
            assert im.format == spec.format
            assert im.size == (spec.width, spec.height)
            assert im.mode == spec.mode
            assert mp[0] * 1e6 <= im.width * im.height <= mp[1] * 1e6
            orientation = im.getexif().get(0x0112)
            assert orientation == spec.orientation
            im.load()
            if im.mode == "RGBA":
                alpha = np.asarray(im.getchannel("A"))
                assert alpha.min() == 0 and alpha.max() == 255
            if im.mode == "RGB":
                # Neither flat nor pure noise: smooth, but with real variation.
                px = np.asarray(im, dtype=np.float32)
                assert px.std() > 10
                assert np.abs(np.diff(px, axis=1)).mean() < 40
        seen.add(spec.format if spec.format != "PNG" else f"PNG-{spec.mode}")
        if spec.orientation is not None:
            seen.add("EXIF")
    assert {"JPEG", "WEBP", "PNG-RGBA", "EXIF"} <= seen


def test_corpus_is_deterministic(tmp_path: Path) -> None:
    a = build_corpus(tmp_path / "a", 3, seed=7, megapixels=(0.02, 0.05))
    b = build_corpus(tmp_path / "b", 3, seed=7, megapixels=(0.02, 0.05), jobs=2)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_tiny_tagger_stores_and_selects_as_many_tags_as_a_real_one(tmp_path: Path) -> None:
    """A real WD v3 tagger stores ~50-150 scores >= 0.05 per image and selects ~10-40 at 0.35;
    benchmarks of the store and post-processing are only meaningful if the stand-in does too."""
    from tagd.tagging.families import WD14
    from tagd.tagging.workers import decode_and_prepare

    model = build_tiny_tagger(tmp_path / "model.onnx")
    spec = WD14.preprocess.with_size(448, 448)
    images = build_corpus(tmp_path / "corpus", 8, megapixels=(0.2, 0.4))
    batch = np.stack(
        [decode_and_prepare(p.read_bytes(), {"m": spec}, 10**8)[3]["m"] for p in images]
    ).astype(np.float32)
    probs = _session(model).run(["output"], {"input": batch})[0]
    stored = (probs >= 0.05).sum(axis=1)
    selected = (probs >= 0.35).sum(axis=1)
    assert np.all((stored >= 40) & (stored <= 150)), stored
    assert np.all((selected >= 10) & (selected <= 40)), selected
    # Each image gets its own tags, not one fixed set.
    assert len({tuple(np.flatnonzero(p >= 0.35)) for p in probs}) == len(images)
