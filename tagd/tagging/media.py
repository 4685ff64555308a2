"""What tagd can read beyond Pillow's core formats: optional still-image plugins.

HEIC/HEIF (pillow-heif) and JPEG XL (pillow-jxl-plugin) are optional extras
(`pip install 'tagd[formats]'`); without them such files fail with a reason that names the
extra instead of "not a recognised image format", which would send users hunting for a bug.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from tagd.config import VideoSettings
from tagd.index import paths
from tagd.tagging.formats import CORE_FORMATS, missing_plugin, plugin_formats, still_formats

__all__ = ["CORE_FORMATS", "missing_plugin", "plugin_formats", "still_formats"]


# ---------------------------------------------------------------------------------------
# Videos and animations: N frames spread over the duration, decoded at reduced resolution.

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")
ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")
# After a seek the decoder starts at the previous keyframe; past this many frames the last
# decoded one stands in for the target, so a file with sparse keyframes stays cheap.
MAX_FRAMES_PER_SEEK = 300
# Without a duration in the header the packets are read (not decoded) up to this many.
MAX_PACKETS_SCANNED = 200_000


@dataclass(frozen=True)
class MediaInfo:
    """Stored per file for videos and animations (files.duration, frames, fps)."""

    duration: float
    frames: int | None
    fps: float | None


@dataclass
class Frames:
    images: list[Image.Image]
    width: int
    height: int
    format: str
    info: MediaInfo


def is_video_path(path: str) -> bool:
    return path.lower().endswith(VIDEO_EXTENSIONS)


def spread(lo: float, hi: float, n: int) -> list[float]:
    """N points at the centres of N equal slices of [lo, hi]."""
    step = (hi - lo) / n
    return [lo + step * (i + 0.5) for i in range(n)]


def sample_times(duration: float, settings: VideoSettings) -> list[float]:
    skip = min(max(settings.skip, 0.0), 0.45)
    return spread(duration * skip, duration * (1 - skip), settings.frames)


def sample_indices(count: int, settings: VideoSettings) -> list[int]:
    """Distinct frame numbers for an animation of `count` frames."""
    times = sample_times(float(count), settings)
    return sorted({min(count - 1, int(t)) for t in times})


def reduced(width: int, height: int, target: tuple[int, int] | None) -> tuple[int, int]:
    """Frame size to decode to: scaled down while both sides stay >= `target`."""
    if target is None:
        return width, height
    factor = min(width / target[0], height / target[1])
    if factor <= 1:
        return width, height
    return max(1, round(width / factor)), max(1, round(height / factor))


def aggregate(
    probs: np.ndarray, emb: np.ndarray | None, how: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per tag the max (or mean) over frames is the file's score; the embedding is the
    frames' mean. One frame (a still image) passes through unchanged."""
    if probs.shape[0] == 1:
        return probs[0], None if emb is None else emb[0]
    score = probs.mean(axis=0) if how == "mean" else probs.max(axis=0)
    return score.astype(np.float32), None if emb is None else emb.mean(axis=0)


def frames_of(tensor: np.ndarray) -> np.ndarray:
    """A prepared input as a stack of frames: still images carry one (3-D), media N (4-D)."""
    return tensor if tensor.ndim == 4 else tensor[None]


def animation(
    data: bytes, max_pixels: int, settings: VideoSettings, target: tuple[int, int] | None
) -> Frames | None:
    """Sampled frames of an animated GIF, APNG or WebP; None for a still image."""
    try:
        image = Image.open(io.BytesIO(data), formats=ANIMATED_FORMATS)
    except Exception:
        return None
    with image:
        if not getattr(image, "is_animated", False):
            return None
        width, height = image.size
        if width * height > max_pixels:
            return None  # open_image refuses it with the usual reason
        count = int(getattr(image, "n_frames", 1))
        durations = []
        for i in range(count):
            image.seek(i)
            if image.format == "WEBP":
                image.load()  # WebP sets a frame's duration when it is decoded
            durations.append(max(float(image.info.get("duration") or 0), 0.0))
        total_ms = sum(durations)
        if total_ms > 0:
            ends = np.cumsum(durations)
            times = sample_times(total_ms, settings)
            wanted = sorted({min(count - 1, int(np.searchsorted(ends, t, "right"))) for t in times})
        else:
            wanted = sample_indices(count, settings)
        images: list[Image.Image] = []
        size = reduced(width, height, target)
        for i in wanted:
            image.seek(i)
            frame = image.convert("RGBA")
            if size != frame.size:
                frame = frame.resize(size, Image.Resampling.BOX)
            images.append(frame)
        fmt = str(image.format)
    duration = total_ms / 1000 if total_ms > 0 else 0.0
    fps = count / duration if duration > 0 else None
    return Frames(images, width, height, fmt, MediaInfo(duration, count, fps))


def _video_error(exc: Exception) -> str:
    """FFmpeg's own words without the errno and path PyAV adds around them."""
    text = getattr(exc, "strerror", None) or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def video(
    source: str | io.BytesIO,
    max_pixels: int,
    settings: VideoSettings,
    target: tuple[int, int] | None,
) -> Frames:
    """Seek to N times (never decode the whole file) and decode one frame at each, scaled
    down by FFmpeg while decoding. Raises DecodeError with a reason for unusable files."""
    from tagd.tagging.decode import DecodeError

    try:
        import av
    except ImportError:
        raise DecodeError("video needs the av package: pip install 'tagd[video]'") from None
    try:
        container: Any = av.open(source, metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise DecodeError(f"not a readable video ({_video_error(exc)})") from None
    with container:
        if not container.streams.video:
            raise DecodeError("no video stream in the file (audio only?)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise DecodeError("the video stream has no frame size")
        if width * height > max_pixels:
            raise DecodeError(
                f"video frames are {width}x{height} ({width * height / 1e6:.0f} MP), over the "
                f"max_image_pixels limit of {max_pixels / 1e6:.0f} MP"
            )
        ctx.thread_count = 1
        base = stream.time_base
        start = stream.start_time or 0
        if stream.duration and base:
            duration = float(stream.duration * base)
        elif container.duration:
            duration = container.duration / 1_000_000
        else:
            duration = _scan_duration(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        count = int(stream.frames) or (round(duration * fps) if fps and duration else None)
        size = reduced(width, height, target)
        images: list[Image.Image] = []
        try:
            for t in sample_times(max(duration, 0.0), settings):
                frame = _frame_at(container, stream, start + (int(t / base) if base else 0))
                if frame is not None:
                    images.append(frame.to_image(width=size[0], height=size[1]))
        except av.FFmpegError as exc:
            raise DecodeError(f"cannot decode the video ({_video_error(exc)})") from None
        if not images:
            raise DecodeError(f"no frame could be decoded (codec {ctx.name})")
        return Frames(images, width, height, str(ctx.name).upper(), MediaInfo(duration, count, fps))


def poster(source: str, max_pixels: int, size: int) -> Image.Image:
    """The middle frame of a video, decoded at about `size` pixels: the web UI's thumbnail.
    The middle, not the first, because first frames are often black or a title card."""
    frames = video(source, max_pixels, VideoSettings(frames=1, skip=0.0), (size, size))
    return frames.images[0]


def _scan_duration(container: Any, stream: Any) -> float:
    """The last packet's end time, from the packets alone (no decoding); 0 if none."""
    end = 0
    for i, packet in enumerate(container.demux(stream)):
        if packet.pts is not None:
            end = max(end, packet.pts + (packet.duration or 0))
        if i >= MAX_PACKETS_SCANNED:
            break
    container.seek(0)
    start = stream.start_time or 0
    return float((end - start) * stream.time_base) if stream.time_base else 0.0


def _frame_at(container: Any, stream: Any, pts: int) -> Any:
    """The first frame at or after `pts`, decoding at most MAX_FRAMES_PER_SEEK from the
    keyframe before it; the last decoded frame if the target is not reached."""
    container.seek(max(pts, 0), stream=stream, backward=True, any_frame=False)
    last = None
    for n, frame in enumerate(container.decode(stream)):
        last = frame
        if frame.pts is None or frame.pts >= pts or n >= MAX_FRAMES_PER_SEEK:
            break
    return last


def prepare_frames(
    frames: Frames, specs: dict[str, Any], prepare: Any, compact: Any
) -> dict[str, np.ndarray]:
    """Every sampled frame through each model's preprocessing: {model: [F, ...]}."""
    return {
        name: compact(np.stack([prepare(im, spec) for im in frames.images]), spec)
        for name, spec in specs.items()
    }


_VIDEO_BRANDS = (
    b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1",
    b"M4V ", b"M4VH", b"qt  ", b"dash", b"3gp4", b"3gp5", b"3gp6", b"mmp4",
)  # fmt: skip


def looks_like_video(data: bytes) -> bool:
    """Container magic: ISO-BMFF with a video brand (not HEIF/AVIF), Matroska/WebM, AVI."""
    if data[4:8] == b"ftyp":
        return data[8:12] in _VIDEO_BRANDS
    return data[:4] == b"\x1a\x45\xdf\xa3" or (data[:4] == b"RIFF" and data[8:12] == b"AVI ")


def hash_file(path: str) -> tuple[str, int, int]:
    """(sha256, size, mtime_ns) read in chunks: a video is never held in memory whole."""
    import hashlib

    from tagd.tagging.decode import DecodeError, open_regular

    h = hashlib.sha256()
    fd, st = open_regular(path)
    try:
        with open(fd, "rb", closefd=True) as fh:
            size = 0
            while chunk := fh.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}", transient=True) from exc
    if size == 0:
        raise DecodeError("empty file (0 bytes)", transient=True)
    return h.hexdigest(), size, st.st_mtime_ns


def changed(path: str, size: int, mtime_ns: int) -> bool:
    """Whether the file is no longer the one that was hashed (a copy still in progress)."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (size, mtime_ns)


def decode(
    source: str | bytes,
    specs: dict[str, Any],
    max_pixels: int,
    settings: VideoSettings,
    target: tuple[int, int] | None,
) -> tuple[int, int, str, dict[str, np.ndarray], MediaInfo] | None:
    """A video (by path, or bytes with a container's magic) or an animated image, sampled
    and prepared for every model: (width, height, format, {model: [F, ...]}, info). None
    for a still image, which the usual decoder handles."""
    from tagd.tagging.preprocess import compact, prepare

    if isinstance(source, str):
        frames = video(source, max_pixels, settings, target)
    elif looks_like_video(source):
        frames = video(io.BytesIO(source), max_pixels, settings, target)
    else:
        found = animation(source, max_pixels, settings, target)
        if found is None:
            return None
        frames = found
    try:
        tensors = prepare_frames(frames, specs, prepare, compact)
    finally:
        for im in frames.images:
            im.close()
    return frames.width, frames.height, frames.format, tensors, frames.info


def save_info(conn: Any, file_id: int, info: MediaInfo) -> None:
    """files.duration/frames/fps (migration 0012) for a video or animation."""
    paths.set_media_info(conn, file_id, info.duration, info.frames, info.fps)
