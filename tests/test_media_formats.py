"""More still formats (#13): each decodes to the pixels written; skipped files are counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config
from media_files import psd
from PIL import Image

from tagd import config as config_mod
from tagd.index import db
from tagd.ingest import scanner
from tagd.tagging import formats, media
from tagd.tagging.decode import DecodeError, open_image

COLOUR = (200, 30, 60)


def _write(path: Path, fmt: str, **kw: object) -> Path:
    media.plugin_formats()
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (64, 64) if fmt == "ICO" else (40, 30)
    Image.new("RGB", size, COLOUR).save(path, fmt, **kw)
    return path


CASES = [
    ("a.tga", "TGA", {}),
    ("a.ppm", "PPM", {}),
    ("a.ico", "ICO", {"sizes": [(32, 32)]}),
    ("a.jp2", "JPEG2000", {}),
    ("a.dds", "DDS", {}),
    ("a.heic", "HEIF", {"quality": -1}),
    ("a.jxl", "JXL", {"lossless": True}),
]


@pytest.mark.parametrize(("name", "fmt", "kw"), CASES, ids=[c[0] for c in CASES])
def test_each_added_format_decodes_to_its_pixels(
    tmp_path: Path, name: str, fmt: str, kw: dict
) -> None:
    image = open_image(_write(tmp_path / name, fmt, **kw).read_bytes(), max_pixels=10**8)
    assert image.format == fmt
    pixel = image.convert("RGB").getpixel((5, 5))
    assert all(abs(a - b) <= 2 for a, b in zip(pixel, COLOUR, strict=True)), pixel
    assert name.rsplit(".", 1)[1] in " ".join(config_mod.DEFAULT_EXTENSIONS)


def test_grey_pgm_decodes(tmp_path: Path) -> None:
    path = tmp_path / "g.pgm"
    Image.new("L", (20, 10), 77).save(path)
    image = open_image(path.read_bytes(), max_pixels=10**8)
    assert (image.format, image.mode, image.getpixel((3, 3))) == ("PPM", "L", 77)


def test_psd_is_read_as_its_merged_composite_not_a_layer(tmp_path: Path) -> None:
    flat = psd(tmp_path / "flat.psd", (40, 30), COLOUR)
    layered = psd(tmp_path / "layered.psd", (40, 30), COLOUR, ((0, 0, 255), (0, 255, 0)))
    for path in (flat, layered):
        image = open_image(path.read_bytes(), max_pixels=10**8)
        assert (image.format, image.size, image.getpixel((3, 3))) == ("PSD", (40, 30), COLOUR)


def test_heif_without_its_plugin_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write(tmp_path / "a.heic", "HEIF", quality=-1).read_bytes()
    monkeypatch.setattr(formats, "plugin_formats", lambda: ())
    with pytest.raises(DecodeError) as err:
        open_image(data, max_pixels=10**8)
    assert "pillow-heif" in err.value.reason and "tagd[formats]" in err.value.reason
    jxl = _write(tmp_path / "a.jxl", "JXL", lossless=True).read_bytes()
    assert "pillow-jxl-plugin" in (media.missing_plugin(jxl) or "")
    png = save(tmp_path / "a.png", (1, 2, 3)).read_bytes()
    assert media.missing_plugin(png) is None


def test_scan_counts_files_skipped_by_extension_and_unlistable_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gallery = tmp_path / "g"
    save(gallery / "a.png", (1, 2, 3))
    _write(gallery / "sub" / "b.tga", "TGA")
    for name in ("notes.txt", "x.txt", "clip.xyz", "README"):
        (gallery / name).write_text("x")
    (gallery / ".hidden.txt").write_text("excluded by the default .* glob, not counted")
    (gallery / "locked").mkdir()
    real_scandir = scanner.os.scandir

    def scandir(path: str):  # type: ignore[no-untyped-def]
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(scanner.os, "scandir", scandir)
    cfg = config_mod.parse(
        {"database": str(tmp_path / "t.db"), "watch": [{"path": str(gallery)}], "models": []},
        base=tmp_path,
    )
    conn = db.connect(cfg.database)
    assert scanner.last_skipped(conn) is None
    result = scanner.scan(conn, cfg)
    assert result.seen == 2
    stored = scanner.last_skipped(conn)
    assert stored is not None
    assert stored["files"] == 4
    assert stored["by_extension"] == {".txt": 2, ".xyz": 1, "(none)": 1}
    assert stored["unlistable"] == 1
    assert "locked: Permission denied" in stored["unlistable_examples"][0]


@pytest.mark.slow
def test_stats_shows_what_the_scan_skipped(tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    save(gallery / "a.png", (1, 2, 3))
    for name in ("a.txt", "b.txt", "c.mp3"):
        (gallery / name).write_text("x")
    cfg = write_config(
        tmp_path / "c.yaml",
        {"database": str(tmp_path / "t.db"), "watch": [{"path": str(gallery)}], "models": []},
    )
    before = run_tagd("-c", str(cfg), "scan", "--no-tag")
    assert before.returncode == 0, before.stderr
    text = run_tagd("-c", str(cfg), "stats")
    assert text.returncode == 0, text.stderr
    assert "skipped      3 files by extension (.txt 2, .mp3 1)" in text.stdout
    js = json.loads(run_tagd("-c", str(cfg), "stats", "--format", "json").stdout)
    assert js["skipped"]["by_extension"] == {".txt": 2, ".mp3": 1}
    assert js["skipped"]["unlistable"] == 0
