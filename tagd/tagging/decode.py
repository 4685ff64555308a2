"""Read an untrusted image file once: hash its bytes and decode them safely.

The file is read into memory a single time, so the SHA-256 identity and the pixels always come
from the same bytes (a file rewritten between two reads cannot get another file's tags).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tagd.tagging import formats as media

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Decoders tagd will run on gallery files (tagd.media lists them and the optional plugins).
FORMATS = media.CORE_FORMATS


class DecodeError(Exception):
    """The file is not a usable image. `transient`: worth another try later; `incomplete`:
    empty or truncated, which a file still being copied also is."""

    def __init__(
        self,
        reason: str,
        *,
        transient: bool = False,
        gone: bool = False,
        incomplete: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.gone = gone
        self.incomplete = incomplete


@dataclass(frozen=True)
class FileBytes:
    data: bytes
    sha256: str
    size: int
    mtime_ns: int


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(mode: int) -> DecodeError:
    return DecodeError(f"not a regular file ({_kind(mode)}); only regular files are read")


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """A blocking descriptor and its stat, for a regular file only.

    Opening a FIFO blocks until a writer appears and reading a device may never end, so the
    open is non-blocking and anything but a regular file is refused before a byte is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DecodeError("file no longer exists", gone=True) from None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a UNIX socket cannot be opened
            raise _refuse(stat.S_IFSOCK) from None
        if exc.errno == errno.EISDIR:
            raise _refuse(stat.S_IFDIR) from None
        raise DecodeError(f"cannot read file: {exc.strerror or exc}", transient=True) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_file(path: str, *, max_bytes: int | None = None) -> FileBytes:
    """Read and hash a regular file; the stat comes from the same open descriptor.

    Files over `max_bytes` are refused from their size, never read.
    """
    fd, st = open_regular(path)
    try:
        with open(fd, "rb", closefd=True) as fh:
            if max_bytes is not None and st.st_size > max_bytes:
                raise _too_big(st.st_size, max_bytes)
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise _refuse(stat.S_IFDIR) from None
        raise DecodeError(f"cannot read file: {exc.strerror or exc}", transient=True) from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise _too_big(len(data), max_bytes)
    if not data:
        raise DecodeError("empty file (0 bytes)", transient=True, incomplete=True)
    return FileBytes(data, hashlib.sha256(data).hexdigest(), len(data), st.st_mtime_ns)


def _too_big(size: int, limit: int) -> DecodeError:
    return DecodeError(
        f"file is {size / MIB:.0f} MiB, over the inference.max_file_mb limit of "
        f"{limit / MIB:.0f} MiB; raise the limit to tag it"
    )


MIB = 1 << 20

# Bytes per pixel of a decoded Pillow image, by mode (unknown modes count 4).
_BPP = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "La": 2, "I;16": 2, "I;16B": 2, "I;16L": 2}
_BPP.update({"RGB": 3, "YCbCr": 3, "LAB": 3, "HSV": 3})


def decode_cost(size: tuple[int, int], mode: str, file_bytes: int = 0) -> int:
    """Peak bytes to decode and prepare an image, from its header: the decoded pixels, the
    conversions to RGB (an RGBA canvas and the RGB result for modes with alpha, palettes or
    16-bit samples), the square pad canvas, and the file bytes held alongside."""
    w, h = size
    pixels = w * h
    decoded = pixels * _BPP.get(mode, 4)
    if mode == "RGB":
        convert = 0
    elif mode in ("L", "CMYK", "YCbCr", "LAB", "HSV", "1"):
        convert = pixels * 3
    else:
        convert = pixels * 7
    side = max(w, h)
    return file_bytes + decoded + convert + side * side * 3


def open_image(
    data: bytes,
    *,
    max_pixels: int,
    draft: tuple[int, int] | None = None,
    budget: int | None = None,
) -> Image.Image:
    """Decode the first frame, upright (EXIF orientation applied), fully loaded.

    `draft` lets the JPEG decoder scale down by 1/2..1/8 while staying at least that size;
    `info["full_size"]` keeps the upright size of the undecimated image. An image whose
    decode would need more than `budget` bytes (estimated from the header, after the draft
    scale) is refused before its pixels are decoded.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=media.still_formats())
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height} ({width * height / 1e6:.0f} MP), over the "
                    f"max_image_pixels limit of {max_pixels / 1e6:.0f} MP"
                )
            if getattr(image, "is_animated", False) and image.format != "PSD":
                image.seek(0)
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft)
            if budget is not None:
                cost = decode_cost(image.size, image.mode, len(data))
                if cost > budget:
                    raise DecodeError(
                        f"decoding this {width}x{height} {image.mode} image needs about "
                        f"{cost / MIB:.0f} MiB, over the decode worker's memory budget of "
                        f"{budget / MIB:.0f} MiB (inference.worker_memory_mb)"
                    )
            image.load()
            loaded = image.size
            upright = ImageOps.exif_transpose(image)
            if upright.size != loaded:
                width, height = height, width
            upright.info["full_size"] = (width, height)
            upright.format = image.format
            return upright
        except DecodeError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecodeError(
                f"refused as a possible decompression bomb, over the max_image_pixels limit "
                f"of {max_pixels / 1e6:.0f} MP ({exc})"
            ) from None
        except UnidentifiedImageError:
            reason = media.missing_plugin(data) or "not a recognised image format"
            raise DecodeError(reason) from None
        except OSError as exc:
            text = str(exc)
            transient = "truncated" in text
            raise DecodeError(
                f"corrupt image: {text}", transient=transient, incomplete=transient
            ) from None
        except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
            raise DecodeError(f"corrupt image: {exc}") from None
