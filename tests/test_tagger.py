"""Real ONNX Runtime sessions on the tiny models: batching, layouts, and load errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_models import build_probe_model, probe_reference, write_selected_tags

from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging.families import WD14
from tagd.tagging.hub import ModelError, ModelFiles
from tagd.tagging.tagger import CPU, Tagger, providers_for

CPU_ONLY = InferenceConfig(device="cpu")


def _tagger(folder: Path, inference: InferenceConfig = CPU_ONLY) -> Tagger:
    files = ModelFiles(folder / "model.onnx", folder / "selected_tags.csv", "test")
    return Tagger(ModelConfig(name="t", path=folder), WD14, files, inference)


def test_v2_fixed_batch_layout_freed_after_proof(tmp_path: Path) -> None:
    """WD v1.4 v2 exports: input_1:0 with a fixed batch of 1, output predictions_sigmoid.

    The batch dimension is patched to symbolic only after batch-3 == 3 x batch-1 was shown.
    """
    build_probe_model(
        tmp_path / "model.onnx",
        size=64,
        batch=1,
        input_name="input_1:0",
        output_name="predictions_sigmoid",
    )
    write_selected_tags(tmp_path / "selected_tags.csv")
    tagger = _tagger(tmp_path)
    assert tagger.info.fixed_batch is None
    assert tagger.spec.size == (64, 64)
    rng = np.random.default_rng(0)
    batch = rng.uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    out = tagger.predict(batch)
    assert out.shape == (3, len(tagger.labels))
    for i in range(3):
        np.testing.assert_allclose(out[i], probe_reference(batch[i]), rtol=1e-4, atol=1e-5)


def test_dynamic_batch_equals_single_runs(probe_model: Path) -> None:
    tagger = _tagger(probe_model)
    assert tagger.info.fixed_batch is None and tagger.spec.size == (448, 448)
    assert tagger.provider == CPU
    rng = np.random.default_rng(1)
    batch = rng.uniform(0, 255, (4, 448, 448, 3)).astype(np.float32)
    together = tagger.predict(batch)
    apart = np.concatenate([tagger.predict(batch[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(together, apart, atol=1e-4)


def test_label_count_mismatch_is_reported(tmp_path: Path) -> None:
    build_probe_model(tmp_path / "model.onnx", size=32, n_extra=3)
    write_selected_tags(tmp_path / "selected_tags.csv")
    with pytest.raises(ModelError, match="outputs but selected_tags.csv lists"):
        _tagger(tmp_path)


def test_broken_onnx_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07partial download")
    write_selected_tags(tmp_path / "selected_tags.csv")
    with pytest.raises(ModelError, match="cannot be loaded by ONNX Runtime"):
        _tagger(tmp_path)


def test_cuda_required_but_missing_is_an_error(probe_model: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            _tagger(probe_model, InferenceConfig(device="cuda"))
        except ModelError as exc:
            assert "inference.device is cuda" in str(exc)
        else:
            pytest.skip("a working CUDA device is present")
    else:
        with pytest.raises(ModelError, match="inference.device is cuda"):
            _tagger(probe_model, InferenceConfig(device="cuda"))


def test_provider_choice() -> None:
    cuda_avail = ["CUDAExecutionProvider", CPU]
    assert providers_for(InferenceConfig(device="cpu"), cuda_avail) == [CPU]
    assert providers_for(InferenceConfig(), cuda_avail, gpu_present=False) == [CPU]
    auto = providers_for(InferenceConfig(device_id=1), cuda_avail, gpu_present=True)
    assert auto[0][0] == "CUDAExecutionProvider" and auto[0][1]["device_id"] == 1
    assert auto[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    assert providers_for(InferenceConfig(), [CPU], gpu_present=True) == [CPU]
