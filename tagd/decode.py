"""Read an untrusted image file once: hash its bytes and decode them safely.

The file is read into memory a single time, so the SHA-256 identity and the pixels always come
from the same bytes (a file rewritten between two reads cannot get another file's tags).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tagd import media

ImageFile.LOAD_TRUNCATED_IMAGES = False

# Decoders tagd will run on gallery files (tagd.media lists them and the optional plugins).
FORMATS = media.CORE_FORMATS


class DecodeError(Exception):
    """The file is not a usable image. `transient` means it may still be being written."""

    def __init__(self, reason: str, *, transient: bool = False, gone: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient
        self.gone = gone


@dataclass(frozen=True)
class FileBytes:
    data: bytes
    sha256: str
    size: int
    mtime_ns: int


def read_file(path: str) -> FileBytes:
    """Read and hash a regular file; the stat comes from the same open descriptor."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DecodeError("not a regular file")
            data = fh.read()
    except FileNotFoundError:
        raise DecodeError("file no longer exists", gone=True) from None
    except IsADirectoryError:
        raise DecodeError("not a regular file") from None
    except OSError as exc:
        raise DecodeError(f"cannot read file: {exc.strerror or exc}", transient=True) from exc
    if not data:
        raise DecodeError("empty file (0 bytes)", transient=True)
    return FileBytes(data, hashlib.sha256(data).hexdigest(), len(data), st.st_mtime_ns)


def open_image(
    data: bytes, *, max_pixels: int, draft: tuple[int, int] | None = None
) -> Image.Image:
    """Decode the first frame, upright (EXIF orientation applied), fully loaded.

    `draft` lets the JPEG decoder scale down by 1/2..1/8 while staying at least that size;
    `info["full_size"]` keeps the upright size of the undecimated image.
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
            raise DecodeError(f"corrupt image: {text}", transient=transient) from None
        except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
            raise DecodeError(f"corrupt image: {exc}") from None
