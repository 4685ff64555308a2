"""The #13 families fed as their references feed them, read through probe models whose
outputs are what tagd gave them (band = top 8 rows, centre = middle 8x8, per channel)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tagd, write_config
from new_family_models import (
    animetimm_folder,
    build_probe,
    camie_folder,
    cl_tagger_folder,
    pixai_folder,
)
from PIL import Image

from tagd import catalog
from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, hub
from tagd.tagging.hub import ModelError
from tagd.tagging.preprocess import prepare
from tagd.tagging.tagger import Tagger

RED = Image.new("RGB", (200, 100), (255, 0, 0))
CLEAR = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
WHITE_IMAGENET = [2.2489, 2.4286, 2.6400]
RED_IMAGENET = [2.2489, -2.0357, -1.8044]


def _tagger(folder: Path, family: str) -> Tagger:
    fam = families.get(family)
    model = ModelConfig(name=family, path=folder, family=family)
    return Tagger(model, fam, hub.resolve(model, fam), InferenceConfig("cpu"))


def _fed(tagger: Tagger, image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """The probe's features (undoing tagd's sigmoid) and the stored embedding."""
    probs, emb = tagger.predict_with_embeddings(prepare(image, tagger.spec)[None])
    p = probs[0].astype(np.float64)
    return np.log(p / (1 - p)), None if emb is None else emb[0]


def test_pixai_stretches_rgb_minus_one_to_one_and_uses_prediction(tmp_path: Path) -> None:
    t = _tagger(pixai_folder(tmp_path / "pixai"), "pixai")
    assert t.spec.fit == "stages" and t.spec.channels == "RGB" and t.spec.size == (448, 448)
    assert t.info.output_name == "prediction"
    red, emb = _fed(t, RED)
    np.testing.assert_allclose(red, [1, -1, -1, 1, -1, -1], atol=0.02)
    assert emb is not None
    np.testing.assert_allclose(emb, red, atol=1e-3)
    clear, _ = _fed(t, CLEAR)
    np.testing.assert_allclose(clear, [1] * 6, atol=0.02)
    assert t.thresholds == {"general": 0.30, "character": 0.85}
    assert t.labels.namespaces == ("general",) * 3 + ("character",) * 3


def test_pixai_without_preprocess_json_uses_the_same_preset(tmp_path: Path) -> None:
    t = _tagger(pixai_folder(tmp_path / "p", preprocess=False), "pixai")
    assert t.spec.fit == "stretch"
    red, _ = _fed(t, RED)
    np.testing.assert_allclose(red, [1, -1, -1, 1, -1, -1], atol=0.02)


@pytest.mark.parametrize("space_format", [False, True])
def test_cl_tagger_pads_white_and_feeds_bgr(tmp_path: Path, space_format: bool) -> None:
    t = _tagger(cl_tagger_folder(tmp_path / "cl", space_format=space_format), "cl-tagger")
    assert t.info.input_name == "input_image"
    red, emb = _fed(t, RED)
    np.testing.assert_allclose(red, [1, 1, 1, -1, -1, 1], atol=0.02)
    assert emb is None
    clear, _ = _fed(t, CLEAR)
    np.testing.assert_allclose(clear, [1] * 6, atol=0.02)
    assert t.labels.namespaces == (
        "general",
        "character",
        "rating",
        "rating",
        "quality",
        "quality",
    )


def test_cl_tagger_float16_graph_gets_float16_input(tmp_path: Path) -> None:
    t = _tagger(cl_tagger_folder(tmp_path / "cl16", float16=True), "cl-tagger")
    assert t.info.input_type == "tensor(float16)"
    red, _ = _fed(t, RED)
    np.testing.assert_allclose(red, [1, 1, 1, -1, -1, 1], atol=0.02)


def test_camie_drops_alpha_pads_with_the_mean_and_reads_the_refined_output(
    tmp_path: Path,
) -> None:
    t = _tagger(camie_folder(tmp_path / "camie"), "camie-v2")
    assert t.info.output_name == "refined_predictions"
    red, _ = _fed(t, RED)
    np.testing.assert_allclose(red, [0.0056, -0.0049, 0.0082, *RED_IMAGENET], atol=0.03)
    clear, _ = _fed(t, CLEAR)
    np.testing.assert_allclose(clear, [-2.1179, -2.0357, -1.8044] * 2, atol=0.02)
    assert t.labels.names[4] == "general" and t.labels.namespaces[4] == "rating"
    assert t.labels.namespaces[2:4] == ("copyright", "artist")
    assert t.labels.namespaces[5] == "meta"
    assert families.CAMIE_V2.unverified


def test_animetimm_reads_size_and_normalisation_from_its_preprocess_json(tmp_path: Path) -> None:
    t = _tagger(animetimm_folder(tmp_path / "a"), "animetimm")
    assert t.spec.size == (384, 384)
    red, emb = _fed(t, RED)
    np.testing.assert_allclose(red, [*WHITE_IMAGENET, *RED_IMAGENET], atol=0.03)
    assert emb is not None
    clear, _ = _fed(t, CLEAR)
    np.testing.assert_allclose(clear, WHITE_IMAGENET * 2, atol=0.02)
    clip = _tagger(
        animetimm_folder(tmp_path / "b", size=224, mean=(0.5,) * 3, std=(0.5,) * 3), "animetimm"
    )
    assert clip.spec.size == (224, 224)
    red, _ = _fed(clip, RED)
    np.testing.assert_allclose(red, [1, 1, 1, 1, -1, -1], atol=0.03)


def test_a_preprocess_json_stage_tagd_does_not_know_is_refused(tmp_path: Path) -> None:
    folder = animetimm_folder(tmp_path / "a")
    (folder / "preprocess.json").write_text(json.dumps({"test": [{"type": "random_crop"}]}))
    with pytest.raises(ModelError, match="preprocess.json stage 0: stage type 'random_crop'"):
        _tagger(folder, "animetimm")


def test_missing_scores_output_is_one_clear_line(tmp_path: Path) -> None:
    folder = pixai_folder(tmp_path / "p")
    build_probe(folder / "model.onnx", outputs="logits", size=448)
    with pytest.raises(ModelError, match="has no output 'prediction' \\(outputs: output\\)"):
        _tagger(folder, "pixai")


def test_catalog_entries_for_the_new_families() -> None:
    for word, family in (
        ("pixai-tagger-v0.9", "pixai"),
        ("cl-tagger-1.0x", "cl-tagger"),
        ("camie-tagger-v2", "camie-v2"),
        ("animetimm-mobilenetv3", "animetimm"),
    ):
        entry = catalog.lookup(word)
        assert entry is not None and entry.family == family, word
        assert entry.revision, word
    assert catalog.lookup("cl-tagger-1.0x").revision.startswith("0b6e9b4e")  # type: ignore[union-attr]


@pytest.mark.slow
def test_scan_with_cl_tagger_stores_new_namespaces_and_top1_groups(tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    gallery.mkdir()
    RED.save(gallery / "red.png")
    folder = cl_tagger_folder(tmp_path / "cl")
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "cl", "path": str(folder), "family": "cl-tagger"}],
            "inference": {"device": "cpu"},
        },
    )
    scan = run_tagd("-c", str(cfg), "scan")
    assert scan.returncode == 0, scan.stderr
    shown = run_tagd("-c", str(cfg), "show", str(gallery / "red.png"), "--format", "json")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    # Features for red: logits [1,1,1,-1,-1,1]: quality is top-1 (worst_quality, 0.73),
    # rating top-1 (general, 0.73 over explicit 0.27), long_hair 0.73 >= 0.55.
    assert "worst_quality" in text and "best_quality" not in text
    found = run_tagd("-c", str(cfg), "search", "quality:worst_quality")
    assert found.returncode == 0 and found.stdout.strip() == str(gallery / "red.png")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.slow
def test_hub_fetches_external_weights_beside_the_graph_and_names_the_licence_step(
    tmp_path: Path,
) -> None:
    """A cl_tagger repo whose weights sit in model.onnx.data (in a subfolder) is fetched
    whole and tagged offline; a gated repo fails with one line naming the licence step."""
    import onnx
    from conftest import save
    from hf_server import HubServer

    repo = cl_tagger_folder(tmp_path / "repo")
    graph_path = repo / "cl_tagger_1_0x" / "model.onnx"
    model = onnx.load(graph_path)
    onnx.save(
        model,
        graph_path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
    )
    assert (repo / "cl_tagger_1_0x" / "model.onnx.data").stat().st_size >= 16384
    gallery = tmp_path / "g"
    red = save(gallery / "r.png", (255, 0, 0))
    cache = tmp_path / "hf"
    base = {"database": str(tmp_path / "t.db"), "watch": [str(gallery)], "hf_cache": str(cache)}
    entry = {"name": "cl", "repo": "cella/cl", "family": "cl-tagger"}
    online = write_config(tmp_path / "on.yaml", {**base, "models": [entry]})
    gated = write_config(
        tmp_path / "gated.yaml", {**base, "models": [{**entry, "repo": "cella/gated"}]}
    )
    with HubServer(
        {"cella/cl": repo, "cella/gated": repo}, COMMIT, gated=frozenset({"cella/gated"})
    ) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_test"}
        r = run_tagd("-c", str(online), "models", "pull", "cl", env=env)
        assert r.returncode == 0, r.stderr
        r = run_tagd("-c", str(gated), "models", "pull", "cl", env=env)
        assert r.returncode != 0
        assert "gated repository" in r.stderr and "accept its licence" in r.stderr
        assert "https://huggingface.co/cella/gated" in r.stderr and "HF_TOKEN" in r.stderr
        assert "Traceback" not in r.stderr
        assert next(ln for ln in r.stderr.splitlines() if "licence" in ln).startswith("tagd: model")
    snapshot = cache / "models--cella--cl" / "snapshots" / COMMIT / "cl_tagger_1_0x"
    assert (snapshot / "model.onnx.data").is_file()
    offline = write_config(tmp_path / "off.yaml", {**base, "offline": True, "models": [entry]})
    r = run_tagd("-c", str(offline), "scan")
    assert r.returncode == 0, r.stderr
    found = run_tagd("-c", str(offline), "search", "quality:worst_quality")
    assert found.stdout.split() == [str(red)], found.stderr
    import sqlite3

    with sqlite3.connect(tmp_path / "t.db") as conn:
        revision = conn.execute("SELECT revision FROM models WHERE name = 'cl'").fetchone()[0]
    assert revision == COMMIT  # the snapshot's commit, though the graph sits in a subfolder
