"""Writers for the test files of #13: still formats Pillow cannot save (PSD), videos, animations."""

from __future__ import annotations

import struct
from pathlib import Path


def _pascal(name: bytes) -> bytes:
    raw = bytes([len(name)]) + name
    return raw + b"\0" * (-len(raw) % 4)


def psd(
    path: Path,
    size: tuple[int, int],
    composite: tuple[int, int, int],
    layers: tuple[tuple[int, int, int], ...] = (),
) -> Path:
    """An 8-bit RGB Photoshop file whose merged composite is `composite` and whose layers
    (each full-canvas, uncompressed) have other colours, so a reader of the layers is caught."""
    w, h = size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)
    layer_info = b""
    if layers:
        records, channel_data = b"", b""
        for i, colour in enumerate(layers):
            plane = 2 + w * h
            records += struct.pack(">iiiiH", 0, 0, h, w, 3)
            records += b"".join(struct.pack(">hI", c, plane) for c in range(3))
            extra = struct.pack(">II", 0, 0) + _pascal(f"layer{i}".encode())
            records += b"8BIMnorm" + bytes([255, 0, 0, 0]) + struct.pack(">I", len(extra)) + extra
            channel_data += b"".join(struct.pack(">H", 0) + bytes([v]) * (w * h) for v in colour)
        body = struct.pack(">h", len(layers)) + records + channel_data
        body += b"\0" * (-len(body) % 2)
        layer_info = struct.pack(">I", len(body)) + body
    mask_section = layer_info + struct.pack(">I", 0) if layers else b""
    sections = struct.pack(">I", 0) + struct.pack(">I", 0)
    sections += struct.pack(">I", len(mask_section)) + mask_section
    image = struct.pack(">H", 0) + b"".join(bytes([v]) * (w * h) for v in composite)
    path.write_bytes(header + sections + image)
    return path
