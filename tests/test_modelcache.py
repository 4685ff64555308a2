"""Model start cache: warm starts skip onnx and the probe runs, never serve a stale graph."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from family_models import build, reference

from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, graph, modelcache
from tagd.tagging.hub import ModelFiles
from tagd.tagging.tagger import Tagger

N_TAGS = 5


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TAGD_MODEL_CACHE", str(root))
    return root


def _tagger(folder: Path, n_tags: int = N_TAGS) -> Tagger:
    (folder / "class.json").write_text(json.dumps({str(i): f"t{i}" for i in range(n_tags)}))
    files = ModelFiles(folder / "model.onnx", folder / "class.json", "test")
    return Tagger(
        ModelConfig(name="t", path=folder, family="ml-danbooru"),
        families.get("ml-danbooru"),
        files,
        InferenceConfig("cpu"),
    )


def _no_preparation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm start must not parse the graph with onnx nor run the proofs."""

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("a warm start prepared the graph")

    monkeypatch.setattr(graph, "load", refuse)
    monkeypatch.setattr(graph, "finish", refuse)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "meta.json").exists())


def test_warm_start_matches_cold_start_without_preparing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", batch=1, head="gemm", reshape_fixed=True)
    cold = _tagger(tmp_path)
    assert cold.info.fixed_batch is None and cold.head is not None
    assert len(_entries(cache)) == 1
    _no_preparation(monkeypatch)
    warm = _tagger(tmp_path)
    assert warm.info.fixed_batch is None
    assert warm.head is not None
    np.testing.assert_array_equal(warm.head.weights, cold.head.weights)
    np.testing.assert_array_equal(warm.head.bias, cold.head.bias)
    batch = graph.probe_batch(warm.spec, 3, seed=5)
    probs, emb = warm.predict_with_embeddings(batch)
    cold_probs, cold_emb = cold.predict_with_embeddings(batch)
    np.testing.assert_allclose(probs, cold_probs, atol=1e-6)
    np.testing.assert_allclose(emb, cold_emb, atol=1e-6)
    for i in range(3):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS), atol=1e-5)


def test_refused_patch_and_failed_head_are_remembered(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative verification results are cached too: batch 1 stays, no embeddings."""
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", batch=1, head="gemm", mix_batch=True)
    assert _tagger(tmp_path).info.fixed_batch == 1
    folder = tmp_path / "sig"
    folder.mkdir()
    build(folder / "model.onnx", N_TAGS, layout="NCHW", head="matmul_add_sigmoid")
    assert _tagger(folder).head is None
    _no_preparation(monkeypatch)
    assert _tagger(tmp_path).info.fixed_batch == 1
    warm = _tagger(folder)
    assert warm.head is None
    assert warm.predict_with_embeddings(graph.probe_batch(warm.spec, 2))[1] is None


@pytest.mark.parametrize("how", ["replaced", "rewritten_in_place"])
def test_changed_model_file_is_never_served_from_cache(
    tmp_path: Path, cache: Path, how: str
) -> None:
    """Same size, mtime set back: the content hash is taken again and a new entry is built."""
    path = tmp_path / "model.onnx"
    build(path, N_TAGS, layout="NCHW", head="gemm", seed=0)
    first = _tagger(tmp_path)
    st = path.stat()
    other = tmp_path / "other.onnx"
    build(other, N_TAGS, layout="NCHW", head="gemm", seed=1)
    data = other.read_bytes()
    assert len(data) == st.st_size and data != path.read_bytes()
    if how == "replaced":
        os.replace(other, path)
    else:
        with open(path, "r+b") as fh:
            fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = _tagger(tmp_path)
    batch = graph.probe_batch(second.spec, 2, seed=9)
    probs = second.predict(batch)
    for i in range(2):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS, seed=1), atol=1e-5)
    assert not np.allclose(probs, first.predict(batch), atol=1e-3)
    assert len(_entries(cache)) == 2


def test_hash_is_remembered_until_the_file_changes(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 1000)
    monkeypatch.setattr(modelcache, "RACY_NS", 0)
    calls: list[Path] = []
    real = modelcache._hash_file
    monkeypatch.setattr(modelcache, "_hash_file", lambda p: calls.append(p) or real(p))
    first = modelcache.file_sha256(path)
    assert modelcache.file_sha256(path) == first and len(calls) == 1
    st = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = modelcache.file_sha256(path)
    assert changed != first and len(calls) == 2


def test_just_written_file_is_hashed_again(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write in the same timestamp tick as the memo would be invisible, so none is kept."""
    path = tmp_path / "blob"
    path.write_bytes(b"a" * 1000)
    calls: list[Path] = []
    real = modelcache._hash_file
    monkeypatch.setattr(modelcache, "_hash_file", lambda p: calls.append(p) or real(p))
    modelcache.file_sha256(path)
    modelcache.file_sha256(path)
    assert len(calls) == 2


def test_the_head_is_mapped_and_an_older_entry_is_still_read(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head's arrays are kept as .npy files and memory-mapped by a start (none of its
    megabytes read before they are used); an entry written by an earlier tagd, with them in
    head.npz, still serves a warm start."""
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="gemm")
    cold = _tagger(tmp_path)
    assert cold.head is not None
    (entry,) = _entries(cache)
    assert {p.name for p in entry.iterdir()} >= {"head-weights.npy", "head-bias.npy"}
    found = modelcache.lookup(entry.name)
    assert found is not None and isinstance(found.weights, np.memmap)
    np.testing.assert_array_equal(found.weights, cold.head.weights)
    np.testing.assert_array_equal(found.bias, cold.head.bias)

    np.savez(entry / "head.npz", weights=cold.head.weights, bias=cold.head.bias)
    (entry / "head-weights.npy").unlink()
    (entry / "head-bias.npy").unlink()
    _no_preparation(monkeypatch)
    warm = _tagger(tmp_path)
    assert warm.head is not None
    np.testing.assert_array_equal(warm.head.weights, cold.head.weights)
    np.testing.assert_array_equal(warm.head.bias, cold.head.bias)


def test_weights_apart_are_served_until_their_file_is_rewritten(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prepared graph keeps its weights in model.onnx.data, which ONNX Runtime maps; a
    warm start from it answers as the cold one did, and a weights file rewritten since the
    entry was made (its size or mtime changed) is never served: the model is prepared again."""
    n = 400  # a head of 3 x 400 floats: large enough to be moved out of the protobuf
    build(tmp_path / "model.onnx", n, layout="NCHW", batch=1, head="gemm", reshape_fixed=True)
    cold = _tagger(tmp_path, n)
    (entry,) = _entries(cache)
    data = entry / modelcache.DATA
    assert data.stat().st_size > 10 * (entry / "model.onnx").stat().st_size
    batch = graph.probe_batch(cold.spec, 2, seed=4)
    with monkeypatch.context() as m:
        _no_preparation(m)
        warm = _tagger(tmp_path, n)
        np.testing.assert_allclose(warm.predict(batch), cold.predict(batch), atol=1e-6)

    st = data.stat()
    data.write_bytes(b"\0" * st.st_size)  # same size, other weights
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert modelcache.lookup(entry.name) is None
    again = _tagger(tmp_path, n)
    np.testing.assert_allclose(again.predict(batch)[0], reference(batch[0], "NCHW", n), atol=1e-5)
    assert modelcache.lookup(entry.name) is not None


def test_corrupt_cached_graph_is_prepared_again(tmp_path: Path, cache: Path) -> None:
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="gemm")
    _tagger(tmp_path)
    (entry,) = _entries(cache)
    cached = entry / "model.onnx"
    cached.write_bytes(b"\0" * cached.stat().st_size)
    again = _tagger(tmp_path)
    batch = graph.probe_batch(again.spec, 2, seed=2)
    np.testing.assert_allclose(
        again.predict(batch)[0], reference(batch[0], "NCHW", N_TAGS), atol=1e-5
    )
    assert again.head is not None
    assert modelcache.lookup(entry.name) is not None


def test_unwritable_cache_logs_once_and_tags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("TAGD_MODEL_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(modelcache, "_warned", set())
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="gemm")
    with caplog.at_level(logging.WARNING, logger="tagd.tagging.modelcache"):
        _tagger(tmp_path)
        tagger = _tagger(tmp_path)
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1 and "TAGD_MODEL_CACHE" in warnings[0].getMessage()
    assert tagger.head is not None


def test_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAGD_MODEL_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="gemm")
    assert _tagger(tmp_path).head is not None
    assert not (tmp_path / "xdg").exists()
