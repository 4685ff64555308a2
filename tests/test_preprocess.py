"""WD preprocessing against an independent transcription of SmilingWolf's reference."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tagd.tagging.decode import open_image
from tagd.tagging.families import WD14
from tagd.tagging.preprocess import PreprocessSpec, fit, prepare, to_rgb


def reference_wd(image: Image.Image, target: int) -> np.ndarray:
    """wdv3_jax.py / the HF Space: ensure RGB on white, pad square white, bicubic, BGR, 0-255."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (255, 255, 255))
        canvas.alpha_composite(image)
        image = canvas.convert("RGB")
    w, h = image.size
    px = max(image.size)
    padded = Image.new("RGB", (px, px), (255, 255, 255))
    padded.paste(image, ((px - w) // 2, (px - h) // 2))
    if px != target:
        padded = padded.resize((target, target), Image.BICUBIC)
    arr = np.asarray(padded, dtype=np.float32)
    return arr[:, :, ::-1]


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)


SPEC = WD14.preprocess.with_size(448, 448)


@pytest.mark.parametrize(
    "image",
    [
        _noise(640, 480),
        _noise(300, 900, seed=1),
        _noise(100, 60, seed=2),
        _noise(448, 448, seed=3),
        _noise(500, 333, "RGBA", seed=4),
        _noise(200, 200, "L", seed=5),
    ],
    ids=["wide", "tall", "small-upscaled", "exact", "rgba", "grey"],
)
def test_matches_reference(image: Image.Image) -> None:
    ours = prepare(image, SPEC)
    ref = reference_wd(image, 448)
    assert ours.shape == (448, 448, 3)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_palette_transparency_composited_on_white() -> None:
    img = Image.new("P", (40, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.paste(1, (0, 0, 20, 20))
    out = to_rgb(img, (255, 255, 255))
    assert out.getpixel((30, 10)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (255, 0, 0)
    np.testing.assert_array_equal(prepare(img, SPEC), reference_wd(img, 448))


def test_bgr_order_and_range() -> None:
    arr = prepare(Image.new("RGB", (10, 10), (200, 100, 50)), SPEC.with_size(16, 16))
    assert arr[8, 8].tolist() == [50.0, 100.0, 200.0]


def test_white_centred_padding() -> None:
    img = Image.new("RGB", (100, 50), (0, 0, 0))
    out = fit(img, PreprocessSpec(size=(100, 100), resample="nearest"))
    assert out.getpixel((50, 10)) == (255, 255, 255)
    assert out.getpixel((50, 50)) == (0, 0, 0)
    assert out.getpixel((50, 90)) == (255, 255, 255)


def test_sixteen_bit_greyscale_not_saturated() -> None:
    img = Image.new("I;16", (8, 8))
    img.putdata([32768] * 64)
    assert to_rgb(img, (255, 255, 255)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_applied_before_padding() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    decoded = open_image(buf.getvalue(), max_pixels=10**8)
    assert decoded.size == (20, 60)


def test_nchw_layout_with_mean_std() -> None:
    spec = PreprocessSpec(
        size=(4, 4), layout="NCHW", fit="stretch", scale=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3
    )
    arr = prepare(Image.new("RGB", (4, 4), (255, 0, 255)), spec)
    assert arr.shape == (3, 4, 4)
    assert arr[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 1.0])
