"""A small real index for the web tests: generated images tagged by `tagd scan` with the
probe model, plus a hostile file name, a transparent image and a failed file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from conftest import run_tagd, save, write_config
from PIL import Image

HOSTILE_NAME = "<img src=x onerror=alert(1)>.png"
HOSTILE_TAG = "<script>alert(1)</script>"


def build(root: Path, probe_model: Path, **web: object) -> Path:
    """The config path; images under root/g, database under root/s."""
    g = root / "g"
    save(g / "red.png", (250, 10, 10))
    save(g / "red2.png", (240, 12, 12))
    save(g / "blue.png", (10, 10, 250))
    save(g / "green.png", (10, 250, 10), size=(300, 200))
    save(g / "sub" / "alpha.png", (250, 10, 10, 0))
    save(g / HOSTILE_NAME, (200, 200, 200))
    rot = Image.new("RGB", (80, 40), (10, 10, 240))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rot.save(g / "rotated.jpg", exif=exif)
    (g / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = {
        "database": str(root / "s" / "tagd.db"),
        "watch": [{"path": str(g)}],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu"},
        "daemon": {"max_attempts": 1},
        "web": {"allow_edits": True, "thumbnail_size": 128, **web},
    }
    conf = write_config(root / "c.yaml", cfg)
    r = run_tagd("--config", str(conf), "scan")
    assert r.returncode == 0, r.stderr
    return conf


def sha_of(site: dict, name: str) -> str:
    """The content hash of gallery file `name` in the site's index."""
    conn = sqlite3.connect(site["config"].database)
    try:
        row = conn.execute(
            "SELECT f.sha256 FROM paths p JOIN files f ON f.id = p.file_id WHERE p.path = ?",
            (str(site["root"] / "g" / name),),
        ).fetchone()
    finally:
        conn.close()
    assert row is not None, f"{name} is not in the index"
    return str(row[0])
