"""Which still-image formats tagd decodes: Pillow's reliable core plus optional plugins.

Apart from the decoder and the video sampler so both can ask without importing each other.
"""

from __future__ import annotations

import functools

# Pillow-native decoders that read gallery files reliably. Exotic ones stay out (EPS runs
# Ghostscript; FITS, GRIB, MPEG and friends are not gallery formats).
CORE_FORMATS = (
    "JPEG",
    "PNG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "AVIF",
    "TGA",
    "PPM",
    "ICO",
    "JPEG2000",
    "DDS",
    "PSD",
)

_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


@functools.cache
def plugin_formats() -> tuple[str, ...]:
    """Register the optional Pillow plugins that are installed; their format names."""
    found: list[str] = []
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        found.append("HEIF")
    except ImportError:
        pass
    try:
        import pillow_jxl  # noqa: F401  (registers the JXL plugin on import)

        found.append("JXL")
    except ImportError:
        pass
    return tuple(found)


def still_formats() -> tuple[str, ...]:
    """Every Pillow format name tagd will decode here (core plus installed plugins)."""
    return CORE_FORMATS + plugin_formats()


def missing_plugin(data: bytes) -> str | None:
    """A one-line reason when `data` is HEIF or JPEG XL and its plugin is not installed."""
    have = plugin_formats()
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS and "HEIF" not in have:
        return "HEIC/HEIF needs the pillow-heif package: pip install 'tagd[formats]'"
    if (data[:2] == b"\xff\x0a" or data[:12] == _JXL_CONTAINER) and "JXL" not in have:
        return "JPEG XL needs the pillow-jxl-plugin package: pip install 'tagd[formats]'"
    return None
