"""Thumbnails: WebP, made on first request from the original, cached on disk by content hash.

A bounded pool makes them (a cold grid of 100 queues 100 jobs on a few threads rather than
decoding 100 images at once), and two requests for the same hash wait on one job. Videos get
their middle frame (PyAV, through tagging.media). Files that cannot be decoded, or are larger
than `max_pixels`, get a placeholder, never an error.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("tagd.web")

PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">'
    b'<rect width="256" height="256" fill="#444"/><path d="M88 88l80 80M168 88l-80 80" '
    b'stroke="#999" stroke-width="12"/></svg>'
)


def cache_dir(database: Path, configured: Path | None) -> Path:
    """`web.thumbnail_dir`, else `<database>.thumbs` beside the database."""
    return configured or Path(f"{database}.thumbs")


class Thumbnailer:
    def __init__(
        self, directory: Path, size: int, *, workers: int | None = None, max_pixels: int
    ) -> None:
        self.directory = directory
        self.size = size
        self.max_pixels = max_pixels
        n = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tagd-thumb")
        self._pending: dict[str, Future[Path | None]] = {}
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        return self.directory / sha[:2] / f"{sha}-{self.size}.webp"

    def get(self, sha: str, source: Callable[[], list[str]]) -> Path | None:
        """The cached thumbnail of `sha`, made now from the first readable path `source` gives;
        None when none decodes (the caller serves the placeholder)."""
        target = self.path(sha)
        if target.exists():
            return target
        with self._lock:
            fut = self._pending.get(sha)
            if fut is None:
                fut = self.pool.submit(self._make, sha, source)
                self._pending[sha] = fut
        try:
            return fut.result(timeout=60)
        finally:
            with self._lock:
                if self._pending.get(sha) is fut and fut.done():
                    del self._pending[sha]

    def _make(self, sha: str, source: Callable[[], list[str]]) -> Path | None:
        for path in source():
            try:
                data = render(path, self.size, self.max_pixels)
            except Exception as exc:  # any decoder failure means "placeholder", never a 500
                log.debug("no thumbnail for %s: %s", path, exc)
                continue
            target = self.path(sha)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return target
        return None

    def make(self, sha: str, paths: list[str]) -> Path | None:
        """Render now in the caller's thread (the daemon's pre-generation): the same file and
        the same placeholder rule (None) as a request."""
        return self._make(sha, lambda: paths)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def readable_under(path: str, roots: tuple[str, ...]) -> bool:
    """A regular file whose real path lies under a watch root (no symlink escape); any
    regular file when no root is configured."""
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        return False
    if not roots:
        return True
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


def _is_video(path: str) -> bool:
    from tagd.tagging import media

    if media.is_video_path(path):
        return True
    with open(path, "rb") as f:
        return media.looks_like_video(f.read(16))


def render(path: str, size: int, max_pixels: int) -> bytes:
    """A WebP of at most size×size, EXIF orientation applied, alpha kept; for a video, its
    middle frame (an animation's first frame comes from Pillow as-is)."""
    import io

    from PIL import Image, ImageOps

    if _is_video(path):
        from tagd.tagging import media

        frame = media.poster(path, max_pixels, size).convert("RGB")
        frame.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        frame.save(buf, "WEBP", quality=80, method=2)
        return buf.getvalue()
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} is over the {max_pixels} pixel limit")
        if im.format == "JPEG":
            im.draft("RGB", (size * 2, size * 2))
        im.seek(0)
        out = ImageOps.exif_transpose(im)
        if out.mode not in ("RGB", "RGBA"):
            alpha = "A" in out.getbands() or "transparency" in out.info
            out = out.convert("RGBA" if alpha else "RGB")
        out.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        out.save(buf, "WEBP", quality=80, method=2)
        return buf.getvalue()
