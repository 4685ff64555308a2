"""Small videos and animations whose frames the probe models can tell apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def colour_at(i: int, n: int) -> tuple[int, int, int]:
    """The middle fifth of the frames red, the rest blue."""
    return RED if 0.4 * n <= i < 0.6 * n else BLUE


def write_video(
    path: Path,
    *,
    frames: int = 50,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    codec: str = "mpeg4",
    colour=colour_at,  # type: ignore[no-untyped-def]
) -> Path:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            arr = np.empty((size[1], size[0], 3), np.uint8)
            arr[:] = colour(i, frames)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_animation(
    path: Path, fmt: str, *, frames: int = 10, ms: int = 100, size: tuple[int, int] = (40, 30)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.new("RGB", size, colour_at(i, frames)) for i in range(frames)]
    for i, im in enumerate(images):  # distinct frames, so writers do not merge them
        im.putpixel((size[0] - 1, size[1] - 1), (i, i, i))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(path, fmt, save_all=True, append_images=images[1:], duration=ms, loop=0, **kw)
    return path
