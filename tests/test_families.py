"""Family presets against independent transcriptions of each published preprocessing, label
readers, custom presets from YAML and one-word shortcuts; end to end through real sessions."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from family_models import build, reference
from PIL import Image

from tagd import config as cfg
from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, graph
from tagd.tagging.hub import ModelFiles
from tagd.tagging.labels import LabelError, read_class_json, read_tags_json, read_tags_txt
from tagd.tagging.preprocess import prepare
from tagd.tagging.tagger import Tagger


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    n = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, n), dtype=np.uint8), mode)


def ref_deepdanbooru(image: Image.Image, s: int) -> np.ndarray:
    """load_image_for_evaluate: area resize keeping aspect, centre, edge-replicate, /255."""
    image = image.convert("RGB")
    w, h = image.size
    r = min(s / w, s / h)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    small = np.asarray(image.resize((nw, nh), Image.Resampling.BOX), dtype=np.float32)
    top, left = (s - nh) // 2, (s - nw) // 2
    rows = np.clip(np.arange(s) - top, 0, nh - 1)
    cols = np.clip(np.arange(s) - left, 0, nw - 1)
    return small[rows][:, cols] / 255.0


def ref_mldanbooru(image: Image.Image, s: int) -> np.ndarray:
    """demo.py: Resize((s, s)) bilinear, ToTensor (CHW, /255), no Normalize."""
    arr = np.asarray(image.convert("RGB").resize((s, s), Image.Resampling.BILINEAR), np.float32)
    return arr.transpose(2, 0, 1) / 255.0


def ref_jtp(image: Image.Image, s: int) -> np.ndarray:
    """Fit (Lanczos, grow), ToTensor on RGBA, CompositeAlpha(0.5), Normalize(0.5), CenterCrop."""
    image = image.convert("RGBA")
    w, h = image.size
    r = min(s / w, s / h)
    image = image.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.LANCZOS)
    t = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
    rgb, a = t[:3], t[3:4]
    rgb = rgb * a + 0.5 * (1 - a)
    rgb = (rgb - 0.5) / 0.5
    out = np.zeros((3, s, s), np.float32)
    top, left = (s - rgb.shape[1]) // 2, (s - rgb.shape[2]) // 2
    out[:, top : top + rgb.shape[1], left : left + rgb.shape[2]] = rgb
    return out


IMAGES = {
    "wide": _noise(700, 300),
    "tall": _noise(120, 500, seed=1),
    "small": _noise(50, 40, seed=2),
    "square": _noise(256, 256, seed=3),
}


@pytest.mark.parametrize("key", IMAGES)
def test_deepdanbooru_matches_reference(key: str) -> None:
    spec = families.DEEPDANBOORU.preprocess.with_size(256, 256)
    np.testing.assert_allclose(
        prepare(IMAGES[key], spec), ref_deepdanbooru(IMAGES[key], 256), atol=1e-6
    )


@pytest.mark.parametrize("key", IMAGES)
def test_mldanbooru_matches_reference(key: str) -> None:
    spec = families.ML_DANBOORU.preprocess.with_size(320, 320)
    np.testing.assert_allclose(
        prepare(IMAGES[key], spec), ref_mldanbooru(IMAGES[key], 320), atol=1e-6
    )


@pytest.mark.parametrize("key", IMAGES)
def test_jtp_matches_reference(key: str) -> None:
    spec = families.JTP.preprocess
    ours = prepare(IMAGES[key], spec)
    assert ours.shape == (3, 384, 384)
    np.testing.assert_allclose(ours, ref_jtp(IMAGES[key], 384), atol=1e-5)


def test_jtp_alpha_on_grey_within_half_a_level() -> None:
    """tagd composites on (128,128,128) before resizing; the reference resizes RGBA, then
    blends on 0.5. On a sprite (opaque shape, soft edge, transparent surround) they agree."""
    from PIL import ImageDraw, ImageFilter

    img = Image.new("RGBA", (300, 200), (40, 90, 200, 0))
    ImageDraw.Draw(img).ellipse((60, 30, 240, 170), fill=(220, 60, 30, 255))
    img = img.filter(ImageFilter.GaussianBlur(3))
    ours = prepare(img, families.JTP.preprocess)
    ref = ref_jtp(img, 384)
    assert np.abs(ours - ref).mean() < 0.01
    transparent = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    assert np.abs(prepare(transparent, families.JTP.preprocess)).max() < 0.01


def test_label_readers(tmp_path: Path) -> None:
    (tmp_path / "tags.txt").write_text("1girl\nsolo\nhatsune_miku\nrating:safe\nrating:explicit\n")
    (tmp_path / "categories.json").write_text(
        json.dumps(
            [
                {"name": "General", "start_index": 0},
                {"name": "Character", "start_index": 2},
                {"name": "System", "start_index": 3},
            ]
        )
    )
    dd = read_tags_txt(tmp_path / "tags.txt")
    assert dd.names == ("1girl", "solo", "hatsune_miku", "safe", "explicit")
    assert dd.namespaces == ("general", "general", "character", "rating", "rating")
    (tmp_path / "class.json").write_text(json.dumps({"1": "solo", "0": "1girl"}))
    assert read_class_json(tmp_path / "class.json").names == ("1girl", "solo")
    (tmp_path / "tags.json").write_text(json.dumps({"anthro": 1, "blue eyes": 0}))
    assert read_tags_json(tmp_path / "tags.json").names == ("blue_eyes", "anthro")
    (tmp_path / "bad.json").write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(LabelError, match="without gaps"):
        read_class_json(tmp_path / "bad.json")


FAMILY_IO = {
    "deepdanbooru": ("NHWC", "tags.txt", "matmul_add_sigmoid"),
    "ml-danbooru": ("NCHW", "class.json", "matmul_add"),
    "jtp": ("NCHW", "tags.json", "gemm"),
}


@pytest.mark.parametrize("family", FAMILY_IO)
def test_end_to_end_tiny_model(tmp_path: Path, family: str) -> None:
    layout, label_file, head = FAMILY_IO[family]
    n = 4
    build(tmp_path / "model.onnx", n, layout=layout, size=48, head=head)
    names = [f"t{i}" for i in range(n)]
    label = tmp_path / label_file
    if label_file == "tags.txt":
        label.write_text("\n".join(names))
    elif label_file == "class.json":
        label.write_text(json.dumps({str(i): t for i, t in enumerate(names)}))
    else:
        label.write_text(json.dumps({t: i for i, t in enumerate(names)}))
    fam = families.get(family)
    tagger = Tagger(
        ModelConfig(name=family, path=tmp_path, family=family),
        fam,
        ModelFiles(tmp_path / "model.onnx", label, "t"),
        InferenceConfig("cpu"),
    )
    assert tagger.spec.size == (48, 48)
    img = IMAGES["wide"]
    probs, emb = tagger.predict_with_embeddings(prepare(img, tagger.spec)[None])
    expected = reference(prepare(img, tagger.spec), layout, n)
    np.testing.assert_allclose(probs[0], expected, atol=1e-5)
    assert emb is not None and tagger.head is not None


def test_custom_family_from_yaml(tmp_path: Path) -> None:
    conf = cfg.parse(
        {
            "families": {
                "camie": {
                    "base": "ml-danbooru",
                    "fit": "fit-pad",
                    "pad_color": [0, 0, 0],
                    "resample": "lanczos",
                    "size": 512,
                    "thresholds": {"general": 0.3},
                }
            },
            "models": [{"name": "c", "path": "x", "family": "camie"}],
        },
        base=tmp_path,
    )
    fam = families.get("camie", conf.families)
    assert fam.preprocess.size == (512, 512) and fam.preprocess.pad_color == (0, 0, 0)
    assert fam.outputs_logits and fam.label_file == "class.json"
    assert fam.thresholds["general"] == 0.3
    with pytest.raises(cfg.ConfigError, match="families.x.fit: 'crop' is not one of"):
        cfg.parse({"families": {"x": {"fit": "crop"}}}, base=tmp_path)
    with pytest.raises(cfg.ConfigError, match="models\\[0\\].family: unknown family 'jtp2'"):
        cfg.parse({"models": [{"name": "a", "path": "x", "family": "jtp2"}]}, base=tmp_path)


def test_one_word_shortcuts(tmp_path: Path) -> None:
    conf = cfg.parse(
        {"models": [{"repo": "wd-eva02-large-tagger-v3"}, {"name": "wd-v1-4-moat-tagger-v2"}]},
        base=tmp_path,
    )
    assert conf.models[0].name == "wd-eva02-large-tagger-v3"
    assert conf.models[0].repo == "SmilingWolf/wd-eva02-large-tagger-v3"
    assert conf.models[1].repo == "SmilingWolf/wd-v1-4-moat-tagger-v2"
    with pytest.raises(cfg.ConfigError, match="shortcut"):
        cfg.parse({"models": [{"name": "a", "repo": "no-such-tagger"}]}, base=tmp_path)


def test_probe_batch_is_distinct_inputs() -> None:
    batch = graph.probe_batch(families.JTP.preprocess.with_size(32, 32), 3)
    assert batch.shape == (3, 3, 32, 32) and not np.allclose(batch[0], batch[1])


def _hidden_colour_sprite() -> Image.Image:
    """Opaque red square on a transparent surround whose stored colour is blue."""
    img = Image.new("RGBA", (96, 64), (0, 0, 255, 0))
    img.paste((255, 0, 0, 255), (32, 16, 64, 48))
    return img


@pytest.mark.parametrize("family", ["deepdanbooru", "ml-danbooru"])
def test_item19_alpha_fed_as_the_reference_does(tmp_path: Path, family: str) -> None:
    """DeepDanbooru and ML-Danbooru decode to 3 channels: the colour stored under transparent
    pixels is what the model sees. Through a real session, tagd's scores equal the model run on
    the reference preprocessing, and differ from compositing on white."""
    layout, label_file, head = FAMILY_IO[family]
    n = 4
    build(tmp_path / "model.onnx", n, layout=layout, size=48, head=head)
    names = [f"t{i}" for i in range(n)]
    label = tmp_path / label_file
    if label_file == "tags.txt":
        label.write_text("\n".join(names))
    else:
        label.write_text(json.dumps({str(i): t for i, t in enumerate(names)}))
    fam = families.get(family)
    tagger = Tagger(
        ModelConfig(name=family, path=tmp_path, family=family),
        fam,
        ModelFiles(tmp_path / "model.onnx", label, "t"),
        InferenceConfig("cpu"),
    )
    img = _hidden_colour_sprite()
    probs = tagger.predict(prepare(img, tagger.spec)[None])[0]
    ref_input = (ref_deepdanbooru if family == "deepdanbooru" else ref_mldanbooru)(img, 48)
    np.testing.assert_allclose(probs, reference(ref_input, layout, n), atol=1e-5)
    white = prepare(img.copy(), replace(tagger.spec, alpha_background=(255, 255, 255)))
    assert not np.allclose(tagger.predict(white[None])[0], probs, atol=1e-3)
    # The override still works, from YAML: composite on white, or `drop` explicitly.
    conf = cfg.parse(
        {
            "families": {
                "white": {"base": family, "alpha_background": [255, 255, 255]},
                "dropped": {"base": "wd14", "alpha_background": "drop"},
            }
        },
        base=tmp_path,
    )
    assert families.get("white", conf.families).preprocess.alpha_background == (255, 255, 255)
    assert families.get("dropped", conf.families).preprocess.alpha_background is None
    with pytest.raises(cfg.ConfigError, match=r"alpha_background: expected \[r, g, b\].*or drop"):
        cfg.parse({"families": {"x": {"alpha_background": "white"}}}, base=tmp_path)


def test_item19_wd_and_jtp_still_composite() -> None:
    img = _hidden_colour_sprite()
    wd = prepare(img, families.WD14.preprocess.with_size(32, 32))
    assert wd[0, 0].tolist() == [255.0, 255.0, 255.0]  # white, BGR
    assert np.abs(prepare(img, families.JTP.preprocess)[:, 0, 0]).max() < 0.01  # grey
    dd = prepare(img, families.DEEPDANBOORU.preprocess.with_size(32, 32))
    assert dd[0, 0].tolist() == [0.0, 0.0, 1.0]  # the stored blue, RGB /255
