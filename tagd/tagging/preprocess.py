"""Image → model input tensor, driven by a PreprocessSpec. Pure: no file I/O here.

The steps follow the published reference of each family: composite alpha on a background,
fit the image into the model's square (pad centred, edge-replicate, or stretch), resize with
the family's filter, reorder channels, scale, and lay out as NHWC or NCHW.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image

from tagd.vocab import Channels, Fit, Layout

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class Stage:
    """One geometry step of a deepghs `preprocess.json` (imgutils stage names).

    pad_to_size: fit inside `size` (upscaling too) and centre on `background`; resize: exact
    `size`, or the short side to `short`; center_crop: `size`, black where the image is short.
    Sizes are (height, width)."""

    kind: Literal["pad_to_size", "resize", "center_crop"]
    size: tuple[int, int] | None = None
    short: int | None = None
    resample: str = "bilinear"
    background: tuple[int, int, int] = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessSpec:
    """How one model family wants its input. Picklable, so decode workers can use it."""

    size: tuple[int, int]
    layout: Layout = "NHWC"
    channels: Channels = "RGB"
    # pad: pad to a square with pad_color, then resize. stretch: resize to size ignoring aspect.
    # fit-pad / fit-edge: resize the longest side to fit, then pad with pad_color / edge pixels.
    # fit-tensor: resize the longest side to fit, normalise, then pad with tensor_pad (JTP pads
    # with 0 after mean/std 0.5, i.e. mid-grey).
    # stages: the `stages` below, in order (read from a model's preprocess.json).
    fit: Fit = "pad"
    pad_color: tuple[int, int, int] = (255, 255, 255)
    # None: drop the alpha channel and keep the colour stored under transparent pixels, as
    # references that decode to 3 channels do (DeepDanbooru, ML-Danbooru).
    alpha_background: tuple[int, int, int] | None = (255, 255, 255)
    resample: str = "bicubic"
    upscale: bool = True
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    tensor_pad: float = 0.0
    # composite: alpha over alpha_background. drop: keep the colour stored under transparent
    # pixels (Camie's reference does convert("RGB")).
    alpha: Literal["composite", "drop"] = "composite"
    stages: tuple[Stage, ...] = ()

    def with_size(self, height: int, width: int) -> PreprocessSpec:
        return replace(self, size=(height, width))


def to_rgb(image: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    """Any Pillow mode → RGB, compositing transparency onto `background` (None: drop it)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        peak = 65535 if image.mode != "I" or arr.max() > 255 else 255
        image = Image.fromarray((arr.astype(np.float64) * (255.0 / peak)).round().astype(np.uint8))
    elif image.mode == "F":
        arr = np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0)
        image = Image.fromarray(arr.round().astype(np.uint8))
    if background is None:
        return image if image.mode == "RGB" else image.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image)
        return canvas.convert("RGB")
    if image.mode == "L" and "transparency" in image.info:
        return to_rgb(image.convert("RGBA"), background)
    return image if image.mode == "RGB" else image.convert("RGB")


def run_stages(image: Image.Image, stages: tuple[Stage, ...]) -> Image.Image:
    """imgutils' PadToSize / Resize / CenterCrop on a PIL RGB image, in order."""
    for st in stages:
        w, h = image.size
        resample = RESAMPLE[st.resample]
        if st.kind == "pad_to_size":
            assert st.size is not None
            th, tw = st.size
            ratio = min(tw / w, th / h)
            new = (max(1, round(w * ratio)), max(1, round(h * ratio)))
            if new != (w, h):
                image = image.resize(new, resample)
            canvas = Image.new("RGB", (tw, th), st.background)
            canvas.paste(image, ((tw - new[0]) // 2, (th - new[1]) // 2))
            image = canvas
        elif st.kind == "resize":
            if st.size is not None:
                th, tw = st.size
            else:
                assert st.short is not None
                if w <= h:
                    tw, th = st.short, int(st.short * h / w)
                else:
                    th, tw = st.short, int(st.short * w / h)
            if (tw, th) != (w, h):
                image = image.resize((tw, th), resample)
        else:
            assert st.size is not None
            th, tw = st.size
            if w < tw or h < th:
                canvas = Image.new("RGB", (max(w, tw), max(h, th)), (0, 0, 0))
                canvas.paste(image, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
                image, (w, h) = canvas, canvas.size
            left, top = (w - tw) // 2, (h - th) // 2
            image = image.crop((left, top, left + tw, top + th))
    return image


def fit(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Geometry: RGB image of any size → RGB image of exactly spec.size."""
    height, width = spec.size
    resample = RESAMPLE[spec.resample]
    w, h = image.size
    if spec.fit == "stages":
        image = run_stages(image, spec.stages)
        if image.size != (width, height):
            raise ValueError(f"preprocess stages gave {image.size}, expected {(width, height)}")
        return image
    if spec.fit == "stretch":
        return image if (w, h) == (width, height) else image.resize((width, height), resample)
    if spec.fit == "pad":
        side = max(w, h)
        if not spec.upscale:
            side = max(side, width, height)
        if (w, h) != (side, side):
            canvas = Image.new("RGB", (side, side), spec.pad_color)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            image = canvas
        if image.size != (width, height):
            image = image.resize((width, height), resample)
        return image
    ratio = min(width / w, height / h)
    if not spec.upscale:
        ratio = min(ratio, 1.0)
    new = (max(1, round(w * ratio)), max(1, round(h * ratio)))
    if new != (w, h):
        image = image.resize(new, resample)
    if image.size == (width, height) or spec.fit == "fit-tensor":
        return image
    left, top = (width - new[0]) // 2, (height - new[1]) // 2
    if spec.fit == "fit-pad":
        canvas = Image.new("RGB", (width, height), spec.pad_color)
        canvas.paste(image, (left, top))
        return canvas
    arr = np.asarray(image)
    pads = ((top, height - new[1] - top), (left, width - new[0] - left), (0, 0))
    return Image.fromarray(np.pad(arr, pads, mode="edge"))


def to_tensor(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image of spec.size → float32 array in the model's layout, without the batch axis."""
    arr = np.asarray(image, dtype=np.float32)
    if spec.channels == "BGR":
        arr = arr[..., ::-1]
    if spec.scale != 1.0:
        arr = arr * np.float32(spec.scale)
    if spec.mean != (0.0, 0.0, 0.0) or spec.std != (1.0, 1.0, 1.0):
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
        if spec.channels == "BGR":
            mean, std = mean[::-1], std[::-1]
        arr = (arr - mean) / std
    if spec.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


def pad_tensor(arr: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Centre `arr` (already in the model's layout) in spec.size, filling with tensor_pad."""
    height, width = spec.size
    h_axis = 1 if spec.layout == "NCHW" else 0
    h, w = arr.shape[h_axis], arr.shape[h_axis + 1]
    if (h, w) == (height, width):
        return arr
    top, left = (height - h) // 2, (width - w) // 2
    pads = [(0, 0)] * 3
    pads[h_axis] = (top, height - h - top)
    pads[h_axis + 1] = (left, width - w - left)
    return np.pad(arr, pads, mode="constant", constant_values=np.float32(spec.tensor_pad))


def drop_alpha(image: Image.Image) -> Image.Image:
    """RGB from the stored colour channels, transparency ignored (PIL convert("RGB"))."""
    if image.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        return image.convert("RGB")
    return to_rgb(image, (255, 255, 255))


def prepare(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    rgb = drop_alpha(image) if spec.alpha == "drop" else to_rgb(image, spec.alpha_background)
    arr = to_tensor(fit(rgb, spec), spec)
    return pad_tensor(arr, spec) if spec.fit == "fit-tensor" else arr


def compact(tensor: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Raw 0-255 inputs (the WD family) travel as uint8: exact, and a quarter of the bytes to
    pickle through the worker pipe; the tagger widens them to float32 for the session."""
    raw = spec.scale == 1.0 and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    if raw and spec.fit != "fit-tensor":
        return tensor.astype(np.uint8)
    return tensor
