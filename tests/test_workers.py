"""Decode worker processes: results, bad files, a crashing decoder, and JPEG draft decoding."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from crashing_decoder import CrashingDecoder
from PIL import Image

from tagd.tagging.decode import open_image
from tagd.tagging.families import WD14
from tagd.tagging.preprocess import prepare
from tagd.tagging.workers import (
    Decoded,
    DecodePool,
    Decoder,
    Failed,
    Setup,
    Task,
    decode_and_prepare,
    prestart,
)

SPEC = WD14.preprocess.with_size(448, 448)
SETUP = Setup(specs={"m": SPEC}, model_ids={"m": 1}, max_pixels=50_000_000)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth colour field with edges: compresses like a picture, not like noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(img).copy()
    arr[h // 3 : h // 2, w // 4 : w // 2] = (20, 200, 40)
    return Image.fromarray(arr)


def _jpeg(path: Path, w: int, h: int, **kw: object) -> Path:
    _photo(w, h).save(path, "JPEG", quality=92, **kw)
    return path


def _collect(pool: DecodePool, n: int) -> dict[int, Decoded | Failed]:
    out: dict[int, Decoded | Failed] = {}
    while len(out) < n:
        r = pool.get(timeout=60)
        assert r is not None, f"no result after 60 s ({len(out)}/{n})"
        out[r.task_id] = r
    return out


def test_draft_decode_stays_close_to_full_decode(tmp_path: Path) -> None:
    data = _jpeg(tmp_path / "big.jpg", 3000, 2000).read_bytes()
    drafted = open_image(data, max_pixels=10**8, draft=(448, 448))
    assert drafted.size == (750, 500)  # 1/4 scale: still >= 448 on both axes
    assert drafted.info["full_size"] == (3000, 2000)
    full = prepare(open_image(data, max_pixels=10**8), SPEC)
    w, h, fmt, tensors = decode_and_prepare(data, {"m": SPEC}, 10**8)
    assert (w, h, fmt) == (3000, 2000, "JPEG")
    diff = np.abs(tensors["m"] - full)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 6.0, (diff.mean(), diff.max())


def test_draft_keeps_both_axes_at_least_the_model_input(tmp_path: Path) -> None:
    data = _jpeg(tmp_path / "pano.jpg", 4000, 1000).read_bytes()
    assert open_image(data, max_pixels=10**8, draft=(448, 448)).size == (2000, 500)
    small = _jpeg(tmp_path / "small.jpg", 800, 600).read_bytes()
    assert open_image(small, max_pixels=10**8, draft=(448, 448)).size == (800, 600)


def test_draft_full_size_is_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored landscape, shown portrait
    data = _jpeg(tmp_path / "rot.jpg", 2400, 1600, exif=exif.tobytes()).read_bytes()
    w, h, _, tensors = decode_and_prepare(data, {"m": SPEC}, 10**8)
    assert (w, h) == (1600, 2400)
    full = prepare(open_image(data, max_pixels=10**8), SPEC)
    assert np.abs(tensors["m"] - full).mean() < 1.0


def test_pool_decodes_in_worker_processes(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "a.jpg", 640, 480)
    png = tmp_path / "b.png"
    _photo(300, 500, seed=2).save(png)
    bad = tmp_path / "c.jpg"
    bad.write_bytes(b"not an image at all")
    with DecodePool(functools.partial(Decoder, SETUP), 2) as pool:
        for i, p in enumerate([good, png, bad, tmp_path / "gone.jpg"]):
            pool.submit(Task(i, str(p), ("m",)))
        out = _collect(pool, 4)
    assert isinstance(out[0], Decoded) and (out[0].width, out[0].height) == (640, 480)
    expected = prepare(open_image(good.read_bytes(), max_pixels=10**8), SPEC)
    np.testing.assert_array_equal(out[0].tensors["m"], expected)
    assert isinstance(out[1], Decoded) and out[1].tensors["m"].shape == (448, 448, 3)
    assert isinstance(out[2], Failed) and "not a recognised image" in out[2].reason
    assert isinstance(out[3], Failed) and out[3].gone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkserver is Linux-only here")
def test_prestarted_forkserver_is_the_one_workers_come_from(tmp_path: Path) -> None:
    """`tagd scan` starts the forkserver before its model loads; the pool then forks from
    that process instead of waiting for a new one to start."""
    server = prestart()
    assert server is not None and os.path.exists(f"/proc/{server}")
    assert prestart() == server
    good = _jpeg(tmp_path / "a.jpg", 320, 240)
    with DecodePool(functools.partial(Decoder, SETUP), 1) as pool:
        pool.submit(Task(0, str(good), ("m",)))
        out = _collect(pool, 1)
        (pid,) = pool.pids
        assert pid is not None
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            parent = int(fh.read().rsplit(")", 1)[1].split()[1])
    assert parent == server
    assert isinstance(out[0], Decoded) and (out[0].width, out[0].height) == (320, 240)


def test_crashing_worker_fails_only_its_file_and_is_replaced(tmp_path: Path) -> None:
    paths = [_jpeg(tmp_path / f"{i}.jpg", 64, 48) for i in range(4)]
    crash = tmp_path / "crash.jpg"
    crash.write_bytes(paths[0].read_bytes())
    order = [paths[0], crash, paths[1], paths[2], crash, paths[3]]
    with DecodePool(functools.partial(CrashingDecoder, SETUP), 1) as pool:
        first_pid = pool.pids[0]
        for i, p in enumerate(order):
            pool.submit(Task(i, str(p), ("m",)))
        out = _collect(pool, len(order))
        assert pool.crashes == 2 and pool.pids[0] != first_pid
    for i, p in enumerate(order):
        if p == crash:
            assert isinstance(out[i], Failed) and "decoder crashed" in out[i].reason
        else:
            assert isinstance(out[i], Decoded) and out[i].tensors["m"].shape == (448, 448, 3)


@pytest.mark.parametrize("workers", [0, 1])
def test_known_content_is_hashed_but_not_decoded(tmp_path: Path, workers: int) -> None:
    from tagd.index import db

    path = _jpeg(tmp_path / "a.jpg", 64, 48)
    conn = db.connect(tmp_path / "t.db")
    sha = Decoder(SETUP)(Task(0, str(path), ("m",)))
    assert isinstance(sha, Decoded)
    with db.write(conn):
        conn.execute(
            "INSERT INTO models(id, name, family, source, updated_at) "
            "VALUES (1, 'm', 'wd14', '', 0)"
        )
        conn.execute(
            "INSERT INTO files(id, sha256, size, first_seen) VALUES (7, ?, 1, 0)", (sha.sha256,)
        )
        conn.execute(
            "INSERT INTO taggings(file_id, model_id, floor, tagged_at) VALUES (7, 1, 0.05, 0)"
        )
    setup = Setup(SETUP.specs, SETUP.model_ids, SETUP.max_pixels, str(tmp_path / "t.db"))
    with DecodePool(functools.partial(Decoder, setup), workers) as pool:
        pool.submit(Task(1, str(path), ("m",)))
        pool.submit(Task(2, str(path), ("m",), force=("m",)))
        out = _collect(pool, 2)
    assert isinstance(out[1], Decoded) and out[1].sha256 == sha.sha256 and not out[1].tensors
    assert isinstance(out[2], Decoded) and "m" in out[2].tensors
    conn.close()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_large_non_jpeg_is_box_reduced_within_tolerance(tmp_path: Path, fmt: str) -> None:
    buf = tmp_path / f"big.{fmt.lower()}"
    _photo(2600, 1900, seed=4).save(buf, fmt, **({"quality": 95} if fmt == "WEBP" else {}))
    data = buf.read_bytes()
    full = prepare(open_image(data, max_pixels=10**8), SPEC)
    w, h, got_fmt, tensors = decode_and_prepare(data, {"m": SPEC}, 10**8)
    assert (w, h, got_fmt) == (2600, 1900, fmt)
    diff = np.abs(tensors["m"] - full)
    assert 0 < diff.mean() < 1.0 and np.percentile(diff, 99) < 6.0, (diff.mean(), diff.max())


def test_raw_range_tensors_travel_as_exact_uint8() -> None:
    from tagd.tagging.families import FAMILIES
    from tagd.tagging.preprocess import compact, prepare

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    wd = FAMILIES["wd14"].preprocess.with_size(64, 64)
    full = prepare(image, wd)
    small = compact(full, wd)
    assert small.dtype == np.uint8
    np.testing.assert_array_equal(small.astype(np.float32), full)
    jtp = FAMILIES["jtp"].preprocess.with_size(64, 64)
    assert compact(prepare(image, jtp), jtp).dtype == np.float32
