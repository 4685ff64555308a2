"""Deterministic corpus of realistic images for decode/throughput benchmarks.

Real libraries are mostly JPEG with some PNG (a few with transparency) and WebP,
1-9 megapixels in assorted aspect ratios, some JPEGs carrying an EXIF rotation.
Decode cost depends on all of that and on how well the pixels compress: pure
noise makes files huge and slow, flat colour makes them trivially small.  We
therefore paint smooth bicubic-upscaled colour fields with soft-edged shapes
and mild sensor-like noise, which lands in the size range of real pictures.

Run ``python -m bench.corpus OUTDIR N``.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["DEFAULT_MEGAPIXELS", "ImageSpec", "build_corpus", "main", "plan_corpus", "render"]

DEFAULT_MEGAPIXELS: tuple[float, float] = (1.0, 9.0)
#: Share of each format in the corpus.
_FORMAT_SHARES: dict[str, float] = {"JPEG": 0.65, "PNG": 0.20, "WEBP": 0.15}
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
#: width / height; portrait-heavy like illustration sites, plus the odd panorama.
_ASPECTS: tuple[float, ...] = (
    1.0,
    4 / 3,
    3 / 4,
    3 / 2,
    2 / 3,
    16 / 9,
    9 / 16,
    1 / math.sqrt(2),
    2.0,
    0.5,
)
#: EXIF Orientation values other than 1 (upright); 6 and 8 (phone rotations) dominate.
_ORIENTATIONS: tuple[int, ...] = (6, 6, 8, 8, 3, 2, 4, 5, 7)
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to render one corpus image; planned up front so it is cheap to test."""

    index: int
    format: str  # Pillow format name: JPEG, PNG or WEBP
    width: int
    height: int
    mode: str  # RGB, RGBA (PNG only) or L (some JPEGs)
    quality: int | None  # JPEG/WebP quality; None for PNG
    orientation: int | None  # EXIF orientation for JPEG, None when absent
    seed: int

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def filename(self) -> str:
        return f"{self.index:05d}.{_EXT[self.format]}"


def _format_counts(n: int) -> dict[str, int]:
    """Largest-remainder split of n by _FORMAT_SHARES, with every format present once n >= 3."""
    raw = {f: n * s for f, s in _FORMAT_SHARES.items()}
    counts = {f: int(v) for f, v in raw.items()}
    leftovers = sorted(raw, key=lambda f: raw[f] - counts[f], reverse=True)
    for f in leftovers[: n - sum(counts.values())]:
        counts[f] += 1
    if n >= len(counts):
        for f in counts:
            if counts[f] == 0:
                donor = max(counts, key=lambda k: counts[k])
                counts[donor] -= 1
                counts[f] += 1
    return counts


def plan_corpus(
    n: int,
    *,
    seed: int = 0,
    megapixels: tuple[float, float] = DEFAULT_MEGAPIXELS,
) -> list[ImageSpec]:
    """Decide format, size, mode, quality and orientation of each image, deterministically.

    Variants are assigned by rotation rather than coin flips so even small corpora
    contain every case: every other PNG is RGBA, every third JPEG has an EXIF
    orientation and every tenth JPEG (from the 5th) is greyscale.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = megapixels
    if not 0 < lo <= hi:
        raise ValueError(f"bad megapixel range {megapixels}")
    rng = np.random.default_rng(seed)
    formats = [f for f, c in _format_counts(n).items() for _ in range(c)]
    rng.shuffle(formats)
    seen = dict.fromkeys(_FORMAT_SHARES, 0)
    specs: list[ImageSpec] = []
    for i, fmt in enumerate(formats):
        k = seen[fmt]
        seen[fmt] += 1
        target = float(rng.uniform(lo, hi)) * 1e6
        aspect = float(rng.choice(_ASPECTS))
        width = max(1, int(math.sqrt(target * aspect)))
        height = max(1, int(target / width))
        # Rounding must not push the area outside the requested range.
        while width * height > hi * 1e6 and height > 1:
            height -= 1
        while width * height < lo * 1e6:
            height += 1
        mode, quality, orientation = "RGB", None, None
        if fmt == "JPEG":
            quality = int(rng.integers(85, 96))
            if k % 3 == 1:
                orientation = int(rng.choice(_ORIENTATIONS))
            if k % 10 == 4:
                mode = "L"
        elif fmt == "WEBP":
            quality = int(rng.integers(80, 96))
        elif fmt == "PNG" and k % 2 == 0:
            mode = "RGBA"
        specs.append(
            ImageSpec(
                index=i,
                format=fmt,
                width=width,
                height=height,
                mode=mode,
                quality=quality,
                orientation=orientation,
                seed=int(rng.integers(0, 2**63 - 1)),
            )
        )
    return specs


def _rgb_pixels(spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    """Smooth colour field + soft shapes + mild noise: compresses like a real picture."""
    w, h = spec.width, spec.height
    # Paint at quarter resolution; the final bicubic upscale softens every edge.
    sw, sh = max(2, w // 4), max(2, h // 4)
    cells = rng.integers(
        0, 256, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8
    )
    small = Image.fromarray(cells, "RGB").resize((sw, sh), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(small)
    for _ in range(int(rng.integers(6, 20))):
        x0, x1 = sorted(rng.integers(-sw // 4, sw + sw // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-sh // 4, sh + sh // 4, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            width = max(1, int(rng.integers(1, max(2, min(sw, sh) // 40 + 2))))
            draw.line((x0, y0, x1, y1), fill=colour, width=width)
    big = np.asarray(small.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    # Fine detail (texture, hair, foliage) at ~1/6 scale: survives compression as noise does not.
    tw, th = max(2, w // 6), max(2, h // 6)
    detail = rng.normal(0.0, float(rng.uniform(6.0, 14.0)), (th, tw)).astype(np.float32)
    detail_img = Image.fromarray(detail, "F").resize((w, h), Image.Resampling.BICUBIC)
    texture = np.asarray(detail_img, dtype=np.float32).astype(np.int16)[:, :, None]
    # Sensor-like noise: mostly luma, a little chroma.
    sigma = float(rng.uniform(2.0, 4.0))
    noise = rng.normal(0.0, sigma, (h, w, 1)).astype(np.int16)
    noise = noise + rng.normal(0.0, sigma / 2, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(big + texture + noise, 0, 255).astype(np.uint8), "RGB")


def _alpha(spec: ImageSpec, rng: np.random.Generator) -> Image.Image:
    """Alpha with fully transparent, fully opaque and feathered regions, like a cut-out."""
    w, h = spec.width, spec.height
    sw, sh = max(2, w // 8), max(2, h // 8)
    mask = Image.new("L", (sw, sh), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse((sw // 8, sh // 10, sw - sw // 8, sh - sh // 10), fill=255)
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, sw)), int(rng.integers(0, sh))
        r = int(rng.integers(1, max(2, min(sw, sh) // 5)))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=int(rng.integers(0, 256)))
    return mask.resize((w, h), Image.Resampling.BICUBIC)


def render(spec: ImageSpec) -> Image.Image:
    """Render the pixels of one spec (no encoding)."""
    rng = np.random.default_rng(spec.seed)
    img = _rgb_pixels(spec, rng)
    if spec.mode == "L":
        return img.convert("L")
    if spec.mode == "RGBA":
        img.putalpha(_alpha(spec, rng))
    return img


def _save(img: Image.Image, spec: ImageSpec, path: Path) -> None:
    if spec.format == "JPEG":
        kwargs: dict[str, object] = {"quality": spec.quality, "subsampling": "4:2:0"}
        if spec.orientation is not None:
            exif = Image.Exif()
            exif[_EXIF_ORIENTATION_TAG] = spec.orientation
            kwargs["exif"] = exif.tobytes()
        img.save(path, "JPEG", **kwargs)
    elif spec.format == "PNG":
        img.save(path, "PNG", compress_level=6)
    else:
        img.save(path, "WEBP", quality=spec.quality, method=4)


def build_corpus(
    outdir: str | Path,
    n: int,
    *,
    seed: int = 0,
    megapixels: tuple[float, float] = DEFAULT_MEGAPIXELS,
    jobs: int = 1,
) -> list[Path]:
    """Write n images to outdir (created if needed) and return their paths in index order.

    Same (n, seed, megapixels) gives byte-identical files for a given Pillow build,
    whatever ``jobs`` is: each image has its own seed, so processes can share the work.
    """
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    specs = plan_corpus(n, seed=seed, megapixels=megapixels)
    paths = [out / spec.filename for spec in specs]
    if jobs > 1 and len(specs) > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(_write_one, specs, paths))
    else:
        for spec, path in zip(specs, paths, strict=True):
            _write_one(spec, path)
    return paths


def _write_one(spec: ImageSpec, path: Path) -> None:
    _save(render(spec), spec, path)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m bench.corpus OUTDIR N [SEED]``; uses all CPUs, output is unaffected."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3):
        print("usage: python -m bench.corpus OUTDIR N [SEED]", file=sys.stderr)
        return 2
    seed = int(args[2]) if len(args) == 3 else 0
    paths = build_corpus(args[0], int(args[1]), seed=seed, jobs=os.cpu_count() or 1)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images ({total / 1e6:.1f} MB) to {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
