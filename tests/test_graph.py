"""Graph surgery on real ONNX files and real ORT sessions: embeddings, heads, batch patching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from family_models import build, head_params, reference

from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, graph
from tagd.tagging.hub import ModelFiles
from tagd.tagging.tagger import Tagger

N_TAGS = 5


def _class_json(folder: Path) -> Path:
    path = folder / "class.json"
    path.write_text(json.dumps({str(i): f"tag{i}" for i in range(N_TAGS)}))
    return path


def _tagger(folder: Path, family: str = "ml-danbooru") -> Tagger:
    fam = families.get(family)
    files = ModelFiles(folder / "model.onnx", _class_json(folder), "test")
    return Tagger(
        ModelConfig(name="t", path=folder, family=family), fam, files, InferenceConfig("cpu")
    )


@pytest.mark.parametrize("head", ["matmul_add_sigmoid", "gemm_sigmoid", "matmul_add", "gemm"])
def test_find_head_reads_weights_and_bias(tmp_path: Path, head: str) -> None:
    build(tmp_path / "m.onnx", N_TAGS, head=head)
    found = graph.find_head(onnx.load(tmp_path / "m.onnx"))
    w, b = head_params(N_TAGS)
    np.testing.assert_allclose(found.weights, w, rtol=1e-6)
    np.testing.assert_allclose(found.bias, b)
    assert found.sigmoid_in_graph == head.endswith("sigmoid")
    assert found.dim == 3


def test_conv_gap_head_has_no_embedding(tmp_path: Path) -> None:
    build(tmp_path / "m.onnx", N_TAGS, head="conv_gap_sigmoid")
    with pytest.raises(graph.GraphError, match="not produced by a MatMul/Gemm head"):
        graph.find_head(onnx.load(tmp_path / "m.onnx"))


@pytest.mark.parametrize("head", ["matmul_add", "gemm"])
def test_logit_model_embeddings_reproduce_outputs(tmp_path: Path, head: str) -> None:
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head=head)
    tagger = _tagger(tmp_path)
    assert tagger.head is not None
    batch = graph.probe_batch(tagger.spec, 4, seed=7)
    probs, emb = tagger.predict_with_embeddings(batch)
    assert emb is not None and emb.shape == (4, 3)
    np.testing.assert_allclose(emb, batch.mean(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_allclose(tagger.head.probabilities(emb), probs, atol=1e-6)
    for i in range(4):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS), atol=1e-5)


def test_no_head_runs_without_embeddings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build(tmp_path / "model.onnx", N_TAGS, head="conv_gap_sigmoid", size=32)
    (tmp_path / "tags.txt").write_text("\n".join(f"tag{i}" for i in range(N_TAGS)))
    fam = families.get("deepdanbooru")
    files = ModelFiles(tmp_path / "model.onnx", tmp_path / "tags.txt", "test")
    with caplog.at_level(logging.INFO, logger="tagd.tagging.graph"):
        tagger = Tagger(ModelConfig(name="dd", path=tmp_path), fam, files, InferenceConfig("cpu"))
    assert tagger.head is None
    assert "no embeddings" in caplog.text and "MatMul/Gemm" in caplog.text
    probs, emb = tagger.predict_with_embeddings(graph.probe_batch(tagger.spec, 2))
    assert emb is None and probs.shape == (2, N_TAGS)


def test_wrong_logits_flag_drops_embeddings(tmp_path: Path) -> None:
    """A family that applies a sigmoid to a graph that already has one fails verification."""
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="matmul_add_sigmoid")
    assert _tagger(tmp_path).head is None


def test_fixed_batch_with_reshape_constant_is_patched(tmp_path: Path) -> None:
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", batch=1, head="gemm", reshape_fixed=True)
    tagger = _tagger(tmp_path)
    assert tagger.info.fixed_batch is None
    batch = graph.probe_batch(tagger.spec, 3, seed=3)
    probs, emb = tagger.predict_with_embeddings(batch)
    assert emb is not None
    for i in range(3):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS), atol=1e-5)


def test_batch_patch_that_changes_results_is_refused(tmp_path: Path) -> None:
    """A graph that mixes images across the batch axis: the proof fails, batch 1 stays."""
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", batch=1, head="gemm", mix_batch=True)
    tagger = _tagger(tmp_path)
    assert tagger.info.fixed_batch == 1
    batch = graph.probe_batch(tagger.spec, 3, seed=4)
    probs = tagger.predict(batch)
    for i in range(3):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS), atol=1e-5)


def test_dynamic_batch_rewrites_reshape(tmp_path: Path) -> None:
    build(tmp_path / "m.onnx", N_TAGS, batch=1, reshape_fixed=True)
    patched = graph.dynamic_batch(onnx.load(tmp_path / "m.onnx"))
    assert patched is not None
    assert patched.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    shape = next(t for t in patched.graph.initializer if t.name == "fixed_shape")
    assert onnx.numpy_helper.to_array(shape).tolist() == [-1, 3]
    build(tmp_path / "d.onnx", N_TAGS)
    assert graph.dynamic_batch(onnx.load(tmp_path / "d.onnx")) is None
