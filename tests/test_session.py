"""Sessions decide provider and threads once per model; graph surgery returns a value."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from family_models import build, reference

from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, graph, session
from tagd.tagging.hub import ModelError, ModelFiles
from tagd.tagging.session import CPU, CUDA, Sessions
from tagd.tagging.tagger import Scorer, Tagger, inspect

N_TAGS = 5


def _threads(s: object) -> int:
    return int(s.get_session_options().intra_op_num_threads)  # type: ignore[attr-defined]


def test_threads_are_decided_at_the_first_session_and_kept(tmp_path: Path) -> None:
    """The sizer runs once, for the provider that started; every later session reuses it."""
    path = build(tmp_path / "model.onnx", N_TAGS)
    calls: list[bool] = []

    def sizer(on_gpu: bool) -> int:
        calls.append(on_gpu)
        return 3

    sessions = Sessions(InferenceConfig("cpu"), name="m", model_path=path, threads=1, sizer=sizer)
    assert sessions.requested == CPU and sessions.placement is None
    first = sessions.open()
    assert _threads(first) == 3 and calls == [False]
    assert sessions.placement is not None
    assert sessions.placement.provider == CPU and sessions.placement.threads == 3
    assert not sessions.cpu_fallback and sessions.placement.reason == "inference.device is cpu"
    second = sessions.open(path.read_bytes())
    assert _threads(second) == 3 and calls == [False]


def test_configured_threads_win_over_the_sizer(tmp_path: Path) -> None:
    path = build(tmp_path / "model.onnx", N_TAGS)
    sessions = Sessions(
        InferenceConfig("cpu", threads=2), name="m", model_path=path, threads=1, sizer=lambda _: 5
    )
    assert _threads(sessions.open()) == 2 and sessions.threads == 2


def test_cuda_fallback_is_decided_once_with_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """CUDA asked for and not started: one warning, CPU-sized threads, and later sessions of
    the same model go straight to the CPU (no second CUDA attempt, no second warning)."""
    path = build(tmp_path / "model.onnx", N_TAGS)
    monkeypatch.setattr(session, "nvidia_present", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    asked: list[list[object]] = []
    real = ort.InferenceSession

    def spy(source: object, sess_options: object = None, providers: list[object] | None = None):
        asked.append([p if isinstance(p, str) else p[0] for p in providers or []])  # type: ignore[index]
        made = real(source, sess_options=sess_options, providers=[CPU])  # type: ignore[arg-type]
        return made

    monkeypatch.setattr(ort, "InferenceSession", spy)
    sessions = Sessions(
        InferenceConfig(), name="m", model_path=path, threads=1, sizer=lambda gpu: 1 if gpu else 2
    )
    assert sessions.requested == CUDA
    with caplog.at_level(logging.WARNING, logger="tagd.tagging.session"):
        first = sessions.open()
        second = sessions.open(path.read_bytes())
    assert sessions.cpu_fallback and sessions.placement is not None
    assert "fell back to the CPU" in sessions.placement.reason
    assert _threads(first) == _threads(second) == 2
    assert asked == [[CUDA, CPU], [CPU], [CPU]]  # asked, rebuilt for the CPU, then CPU only
    warnings = [r for r in caplog.records if "falling back to the CPU" in r.getMessage()]
    assert len(warnings) == 1


def test_device_cuda_without_a_gpu_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build(tmp_path / "model.onnx", N_TAGS)
    real = ort.InferenceSession
    monkeypatch.setattr(
        ort,
        "InferenceSession",
        lambda source, sess_options=None, providers=None: real(
            source, sess_options=sess_options, providers=[CPU]
        ),
    )
    sessions = Sessions(InferenceConfig(device="cuda"), name="m", model_path=path)
    with pytest.raises(ModelError, match="inference.device is cuda"):
        sessions.open()
    assert sessions.placement is None


def test_unloadable_source_names_the_model_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 64)
    sessions = Sessions(InferenceConfig("cpu"), name="m", model_path=path)
    with pytest.raises(ModelError, match=r"model 'm': .*model.onnx cannot be loaded"):
        sessions.open()


def _files(folder: Path) -> ModelFiles:
    (folder / "class.json").write_text(json.dumps({str(i): f"t{i}" for i in range(N_TAGS)}))
    return ModelFiles(folder / "model.onnx", folder / "class.json", "test")


def test_finish_returns_the_result_and_leaves_its_input_alone(tmp_path: Path) -> None:
    """The batch patch and the head proof give a new session and a `Prepared`; the session
    they started from still runs the original fixed-batch graph."""
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", batch=1, head="gemm", reshape_fixed=True)
    fam = families.get("ml-danbooru")
    files = _files(tmp_path)
    labels = fam.read_labels(files.label_path)
    sessions = Sessions(InferenceConfig("cpu"), name="t", model_path=files.model_path)

    def open_(source: bytes | str | None, emb: str | None) -> Scorer:
        s = sessions.open(source)
        info, exported = inspect(s, fam, labels, "t", files)
        return Scorer(s, info, "t", N_TAGS, fam.outputs_logits, emb, exported)

    loaded = graph.load(str(files.model_path), fam.output)
    assert loaded.head is not None
    data = loaded.serialized()
    first = open_(data, loaded.head.embedding)
    prepared, kept = graph.finish(loaded, data, first, open_, "t")
    assert first.fixed_batch == 1 and kept.fixed_batch is None and kept is not first
    assert prepared.batch_freed and prepared.graph is not None and prepared.graph != data
    assert prepared.head is not None and prepared.why_no_head is None
    batch = graph.probe_batch(kept.spec, 3, seed=4)
    probs, emb = kept.predict_with_embeddings(batch)
    assert emb is not None
    np.testing.assert_allclose(prepared.head.probabilities(emb), probs, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(probs[i], reference(batch[i], "NCHW", N_TAGS), atol=1e-5)


def test_failed_head_proof_is_returned_not_written_back(tmp_path: Path) -> None:
    build(tmp_path / "model.onnx", N_TAGS, layout="NCHW", head="matmul_add_sigmoid")
    tagger = Tagger(
        ModelConfig(name="t", path=tmp_path, family="ml-danbooru"),
        families.get("ml-danbooru"),
        _files(tmp_path),
        InferenceConfig("cpu"),
    )
    assert tagger.head is None and tagger.prepared.head is None
    assert (
        tagger.prepared.why_no_head == "sigmoid(embedding @ W + b) does not reproduce the outputs"
    )
    assert tagger.scorer.head_embedding is None
    assert tagger.predict_with_embeddings(graph.probe_batch(tagger.spec, 2))[1] is None
    assert tagger.sessions.placement is not None and tagger.sessions.placement.provider == CPU
