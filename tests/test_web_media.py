"""Videos and animations in the web UI: a poster frame from the middle of a video as its
thumbnail, a <video> player on the image page, originals served with their content type and
byte ranges (browsers seek a video with Range requests)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from media_video import write_animation, write_video
from webindex import build, sha_of

pytest.importorskip("starlette")
pytest.importorskip("av")
from PIL import Image
from starlette.testclient import TestClient

from tagd.config import load
from tagd.web.app import create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, probe_model: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("webmedia")
    write_video(root / "g" / "clip.mp4", frames=50, size=(64, 48))
    write_animation(root / "g" / "anim.gif", "GIF")
    conf = build(root, probe_model)
    config = load(str(conf))
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        yield {"root": root, "config": config, "client": client}


def test_a_video_thumbnail_is_its_middle_frame(site: dict) -> None:
    r = site["client"].get(f"/thumbs/{sha_of(site, 'clip.mp4')}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    im = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert max(im.size) <= 128
    red, green, blue = im.getpixel((im.width // 2, im.height // 2))  # type: ignore[misc]
    assert red > 200 and blue < 60 and green < 60  # the middle fifth is red, the rest blue


def test_an_undecodable_video_gets_the_placeholder(site: dict, tmp_path: Path) -> None:
    from tagd.web.thumbs import Thumbnailer

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x00" * 200)
    thumbs = Thumbnailer(tmp_path / "t", 128, workers=1, max_pixels=10**8)
    try:
        assert thumbs.get("ab" * 32, lambda: [str(bad)]) is None
    finally:
        thumbs.close()


def test_the_image_page_plays_a_video(site: dict) -> None:
    sha = sha_of(site, "clip.mp4")
    html = site["client"].get(f"/image/{sha}").text
    assert f'<video id="full" class="fit" src="/files/{sha}"' in html
    assert "controls" in html.split("<video", 1)[1].split(">", 1)[0]
    assert '<img id="full"' not in html


def test_an_animation_is_shown_as_is(site: dict) -> None:
    sha = sha_of(site, "anim.gif")
    html = site["client"].get(f"/image/{sha}").text
    assert f'<img id="full" class="fit checker" src="/files/{sha}"' in html
    assert "<video" not in html
    r = site["client"].get(f"/files/{sha}")
    assert r.headers["content-type"] == "image/gif"
    assert Image.open(io.BytesIO(r.content)).n_frames == 10  # type: ignore[attr-defined]


def test_a_video_is_served_as_video_mp4_with_byte_ranges(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "clip.mp4")
    whole = (site["root"] / "g" / "clip.mp4").read_bytes()
    r = c.get(f"/files/{sha}")
    assert r.status_code == 200 and r.content == whole
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers["accept-ranges"] == "bytes"
    part = c.get(f"/files/{sha}", headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(whole)}"
    assert c.get(f"/files/{sha}", headers={"range": f"bytes={len(whole) + 10}-"}).status_code == 416
