"""Videos and animations (#13): frame sampling, aggregation, metadata, failure paths, and
search terms, on files the tests build with PyAV and Pillow (middle frames red, others blue)."""

from __future__ import annotations

import sqlite3
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tagd, write_config
from media_video import write_animation, write_video

from tagd import config as config_mod
from tagd.config import VideoSettings
from tagd.search.query import QueryError, parse
from tagd.tagging import media
from tagd.tagging.decode import DecodeError

BLUE, RED = (0, 0, 255), (254, 0, 0)


def _colours(frames: media.Frames) -> list[str]:
    out = []
    for im in frames.images:
        r, _, b = im.convert("RGB").getpixel((3, 3))[:3]
        out.append("red" if r > 200 and b < 50 else "blue" if b > 200 and r < 50 else "?")
    return out


def test_sampling_spreads_frames_and_skips_the_ends() -> None:
    assert media.sample_times(100.0, VideoSettings(frames=5, skip=0.1)) == pytest.approx(
        [18, 34, 50, 66, 82]
    )
    assert media.sample_indices(3, VideoSettings(frames=5, skip=0.0)) == [0, 1, 2]
    assert media.reduced(4000, 2000, (448, 448)) == (896, 448)
    assert media.reduced(300, 200, (448, 448)) == (300, 200)


def test_aggregate_is_max_or_mean_and_the_embedding_is_the_mean() -> None:
    probs = np.asarray([[0.1, 0.9], [0.5, 0.1]], np.float32)
    emb = np.asarray([[1.0, 3.0], [3.0, 5.0]], np.float32)
    score, mean_emb = media.aggregate(probs, emb, "max")
    np.testing.assert_allclose(score, [0.5, 0.9])
    np.testing.assert_allclose(mean_emb, [2.0, 4.0])  # type: ignore[arg-type]
    np.testing.assert_allclose(media.aggregate(probs, None, "mean")[0], [0.3, 0.5])
    one, e = media.aggregate(probs[:1], None, "max")
    assert one.shape == (2,) and e is None


def test_video_frames_metadata_and_reduced_decoding(tmp_path: Path) -> None:
    path = write_video(tmp_path / "v.mp4", size=(640, 480))
    frames = media.video(str(path), 10**8, VideoSettings(), (64, 64))
    assert _colours(frames) == ["blue", "blue", "red", "blue", "blue"]
    assert frames.info == media.MediaInfo(5.0, 50, 10.0)
    assert (frames.width, frames.height, frames.format) == (640, 480, "MPEG4")
    assert frames.images[0].size == (85, 64)  # scaled by FFmpeg, both sides >= the input


@pytest.mark.parametrize(("fmt", "ext"), [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animations_are_sampled_by_time(tmp_path: Path, fmt: str, ext: str) -> None:
    data = write_animation(tmp_path / f"a.{ext}", fmt, frames=10, ms=100).read_bytes()
    found = media.animation(data, 10**8, VideoSettings(), None)
    assert found is not None and found.format == fmt
    assert _colours(found) == ["blue", "blue", "red", "blue", "blue"]
    assert found.info == media.MediaInfo(pytest.approx(1.0), 10, pytest.approx(10.0))  # type: ignore[arg-type]
    still = tmp_path / f"still.{ext}"
    from PIL import Image

    Image.new("RGB", (8, 8), RED).save(still, fmt)
    assert media.animation(still.read_bytes(), 10**8, VideoSettings(), None) is None


def test_a_ten_hour_video_is_sampled_by_seeking_not_decoded_whole(tmp_path: Path) -> None:
    path = write_video(tmp_path / "long.mp4", frames=60, fps=Fraction(1, 600))  # type: ignore[arg-type]
    start = time.monotonic()
    frames = media.video(str(path), 10**8, VideoSettings(), None)
    assert time.monotonic() - start < 5
    assert frames.info.duration == pytest.approx(36000)
    assert _colours(frames) == ["blue", "blue", "red", "blue", "blue"]


def test_bad_streams_fail_with_a_reason(tmp_path: Path) -> None:
    import av

    audio = tmp_path / "audio.mp4"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(DecodeError, match="no video stream"):
        media.video(str(audio), 10**8, VideoSettings(), None)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\0\0\0\x18ftypisom" + b"garbage" * 100)
    with pytest.raises(DecodeError, match=r"not a readable video \(Invalid data"):
        media.video(str(junk), 10**8, VideoSettings(), None)
    # Stream headers that claim huge frames are refused before any frame is decoded;
    # FFmpeg itself refuses 100k x 100k.
    for side, reason in ((16000, r"16000x16000 \(256 MP\), over the max_image_pixels"),
                         (100_000, "not a readable video")):  # fmt: skip
        claim = tmp_path / f"claim{side}.y4m"
        claim.write_bytes(
            f"YUV4MPEG2 W{side} H{side} F25:1 Ip A1:1 C420jpeg\nFRAME\n".encode() + bytes(1000)
        )
        with pytest.raises(DecodeError, match=reason):
            media.video(str(claim), 150_000_000, VideoSettings(), None)
    big = write_video(tmp_path / "big.mp4", size=(640, 480))
    with pytest.raises(DecodeError, match="over the max_image_pixels limit"):
        media.video(str(big), 100_000, VideoSettings(), None)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError) as err:
        media.hash_file(str(empty))
    assert err.value.transient and "empty" in err.value.reason
    assert media.looks_like_video(big.read_bytes()[:16])
    assert not media.looks_like_video(b"\0\0\0\x18ftypheic")


def test_query_terms_for_media() -> None:
    node = parse("duration:>30s video -animated")
    text = repr(node)
    assert "duration" in text and "video" in text and "animated" in text
    assert parse("duration:1m..2h").range.lo == 60  # type: ignore[attr-defined]
    with pytest.raises(QueryError, match="duration: takes"):
        parse("duration:>long")


def test_video_config_is_validated(tmp_path: Path) -> None:
    c = config_mod.parse({"video": {"frames": 8, "aggregate": "mean"}}, base=tmp_path)
    assert c.video == VideoSettings(frames=8, skip=0.05, aggregate="mean")
    with pytest.raises(config_mod.ConfigError, match="video.aggregate: 'median'"):
        config_mod.parse({"video": {"aggregate": "median"}}, base=tmp_path)
    with pytest.raises(config_mod.ConfigError, match="video.skip"):
        config_mod.parse({"video": {"skip": 0.6}}, base=tmp_path)


def _db_rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["max", "mean"])
def test_scan_tags_videos_and_animations_and_search_finds_them(
    tmp_path: Path, probe_model: Path, how: str
) -> None:
    gallery = tmp_path / "g"
    video = write_video(gallery / "clip.mp4")
    gif = write_animation(gallery / "anim.gif", "GIF")
    webp = write_animation(gallery / "anim.webp", "WEBP")
    (gallery / "broken.webm").write_bytes(b"\x1a\x45\xdf\xa3" + b"\0" * 64)
    db = tmp_path / "t.db"
    conf = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(db),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
            "video": {"aggregate": how},
        },
    )
    r = run_tagd("-c", str(conf), "scan")
    assert r.returncode == 0, r.stderr
    rows = dict(
        (p.rsplit("/", 1)[1], (d, n, fps, fmt))
        for p, d, n, fps, fmt in _db_rows(
            db,
            "SELECT p.path, f.duration, f.frames, f.fps, f.format FROM files f "
            "JOIN paths p ON p.file_id = f.id",
        )
    )
    assert rows["clip.mp4"] == (5.0, 50, 10.0, "MPEG4")
    assert rows["anim.gif"][:3] == (pytest.approx(1.0), 10, pytest.approx(10.0))
    failed = run_tagd("-c", str(conf), "jobs", "--failed")
    assert "broken.webm" in failed.stdout and "not a readable video" in failed.stdout

    def search(q: str) -> list[str]:
        return sorted(Path(p).name for p in run_tagd("-c", str(conf), "search", q).stdout.split())

    assert search("video") == ["clip.mp4"]
    assert search("animated") == ["anim.gif", "anim.webp"]
    assert search("duration:>3s") == ["clip.mp4"]
    assert search("duration:<2s") == ["anim.gif", "anim.webp"]
    # One red frame of five: the max keeps `red`, the mean (about 0.2) does not.
    expected_red = ["anim.gif", "anim.webp", "clip.mp4"] if how == "max" else []
    assert search("red") == expected_red
    assert search("blue") == ["anim.gif", "anim.webp", "clip.mp4"]
    # The stored embedding is the frames' mean of the probe's BGR channel means; the 64x48
    # frames are padded white to a square, so R is 63.75 on a blue frame and 255 on a red one.
    (vec,) = _db_rows(
        db,
        "SELECT e.vector FROM embeddings e JOIN paths p ON p.file_id = e.file_id "
        f"WHERE p.path = '{video}'",
    )[0]
    emb = np.frombuffer(vec, dtype="<f2").astype(np.float32)
    assert emb[2] == pytest.approx((4 * 63.75 + 255) / 5, abs=1)
    assert emb[0] == pytest.approx((4 * 255 + 63.75) / 5, abs=1)
    assert webp.exists() and gif.exists()


@pytest.mark.slow
def test_tag_command_reads_videos_and_animations(
    tmp_path: Path, config_file: Path, probe_model: Path
) -> None:
    clip = write_video(tmp_path / "clip.mp4")
    gif = write_animation(tmp_path / "anim.gif", "GIF")
    r = run_tagd("-c", str(config_file), "tag", "--model", "probe", str(clip), str(gif))
    assert r.returncode == 0, r.stderr
    tags: dict[str, set[str]] = {}
    for line in r.stdout.splitlines():
        path, tag, _ = line.split("\t")
        tags.setdefault(Path(path).name, set()).add(tag)
    for name in ("clip.mp4", "anim.gif"):  # the red middle frame counts (max per tag)
        assert {"red", "blue"} <= tags[name], tags
