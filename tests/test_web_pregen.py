"""Thumbnails made ahead (web.pregenerate_thumbs): the catch-up over every tagged file, then
files tagged later, on a real index with real images; files that do not render are counted
and skipped. The daemon end to end is in test_web_daemon.py."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import save, wait_for, write_config
from indexdb import make_index, sha_of

from tagd.config import load
from tagd.web.pregen import Job, Pregenerator, Tally, run


def _gallery(tmp_path: Path) -> tuple[Path, dict[str, str], Path]:
    """(gallery, name → path, a file outside the gallery)."""
    g = tmp_path / "g"
    paths = {
        "red": save(g / "red.png", (250, 10, 10)),
        "blue": save(g / "sub" / "blue.png", (10, 10, 250)),
        "huge": save(g / "huge.png", (10, 250, 10), size=(400, 400)),  # over max_pixels below
        "corrupt": g / "corrupt.png",
        "gone": g / "gone.png",
        "escape": g / "escape.png",
    }
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    outside = save(tmp_path / "outside.png", (1, 2, 3))
    paths["escape"].symlink_to(outside)
    return g, {k: str(v) for k, v in paths.items()}, outside


def _thumb(directory: Path, path: str, size: int = 64) -> Path:
    """Where docs/web.md says the web server looks: <dir>/ab/<sha256>-<size>.webp."""
    sha = sha_of(path)
    return directory / sha[:2] / f"{sha}-{size}.webp"


@pytest.fixture
def follower(tmp_path: Path) -> Iterator[dict]:
    g, paths, _ = _gallery(tmp_path)
    make_index(tmp_path / "t.db", {p: {"general": 0.9, "smile": 0.6} for p in paths.values()})
    job = Job(
        database=str(tmp_path / "t.db"),
        directory=str(tmp_path / "thumbs"),
        size=64,
        max_pixels=100_000,
        roots=(os.path.realpath(g),),
        poll_s=0.05,
    )
    stop = threading.Event()
    out: dict[str, Tally] = {}
    thread = threading.Thread(target=lambda: out.update(tally=run(job, stop)))
    thread.start()
    try:
        yield {"tmp": tmp_path, "g": g, "paths": paths, "stop": stop, "out": out, "thread": thread}
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


def test_catch_up_then_newly_tagged_files_skipping_what_does_not_render(follower: dict) -> None:
    tmp, g, paths = follower["tmp"], follower["g"], follower["paths"]
    thumbs = tmp / "thumbs"
    for name in ("red", "blue"):
        assert wait_for(_thumb(thumbs, paths[name]).exists, timeout=20), name
    # A file tagged after the catch-up: logged in score_changes, made from the log.
    later = str(save(g / "later.png", (200, 200, 0)))
    make_index(tmp / "t.db", {later: {"general": 0.9}}).close()
    assert wait_for(_thumb(thumbs, later).exists, timeout=20)
    follower["stop"].set()
    follower["thread"].join(10)
    tally = follower["out"]["tally"]
    assert tally.made == 3  # red, blue, later
    assert tally.failed == 4  # huge, corrupt, gone, the symlink out of the roots
    for name in ("huge", "corrupt", "gone", "escape"):
        assert not _thumb(thumbs, paths[name]).exists(), name
    from PIL import Image

    with Image.open(_thumb(thumbs, paths["red"])) as im:
        assert im.format == "WEBP" and max(im.size) <= 64


def test_a_second_run_finds_them_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tagd.index import changes

    g, paths, _ = _gallery(tmp_path)
    make_index(tmp_path / "t.db", {paths["red"]: {"general": 0.9}}).close()
    job = Job(str(tmp_path / "t.db"), str(tmp_path / "th"), 64, 100_000, (str(g),), poll_s=0.01)
    stop = threading.Event()
    real = changes.changes_after

    def once(*args: Any) -> list[tuple[int, int]]:
        stop.set()  # the catch-up is over: end where the follower would start polling
        return real(*args)

    monkeypatch.setattr(changes, "changes_after", once)
    first = run(job, stop)
    assert (first.made, first.present) == (1, 0)
    stop.clear()
    second = run(job, stop)
    assert (second.made, second.present, second.failed) == (0, 1, 0)


@pytest.mark.slow
def test_the_child_process_makes_them_and_ends_when_its_pipe_closes(tmp_path: Path) -> None:
    g, paths, _ = _gallery(tmp_path)
    make_index(tmp_path / "t.db", {paths["red"]: {"general": 0.9}}).close()
    conf = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(g)],
            "web": {"pregenerate_thumbs": True, "thumbnail_size": 64},
        },
    )
    config = load(str(conf))
    assert config.web is not None and config.web.pregenerate_thumbs
    maker = Pregenerator(config, config.web)
    maker.start()
    proc = maker.proc
    assert proc is not None
    try:
        target = _thumb(Path(f"{tmp_path / 't.db'}.thumbs"), paths["red"])
        assert wait_for(target.exists, timeout=30)
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
    finally:
        maker.stop()
    assert proc.returncode == 0


def test_it_waits_while_the_daemon_has_files_to_tag(tmp_path: Path) -> None:
    g, paths, _ = _gallery(tmp_path)
    make_index(tmp_path / "t.db", {paths["red"]: {"general": 0.9}}).close()
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute(
        "INSERT INTO jobs(path, state, mtime_ns, created_at, updated_at) "
        "VALUES ('/g/new.png', 'queued', 0, 0, 0)"
    )
    conn.commit()
    job = Job(str(tmp_path / "t.db"), str(tmp_path / "th"), 64, 100_000, (str(g),), poll_s=0.05)
    stop, tally = threading.Event(), Tally()
    thread = threading.Thread(target=run, args=(job, stop, tally))
    thread.start()
    try:
        assert wait_for(lambda: tally.waits >= 3, timeout=20)
        assert tally.made == 0 and not _thumb(tmp_path / "th", paths["red"]).exists()
        conn.execute("UPDATE jobs SET state = 'done'")
        conn.commit()
        assert wait_for(_thumb(tmp_path / "th", paths["red"]).exists, timeout=20)
        conn.execute("UPDATE jobs SET state = 'queued', not_before = 1e12")  # a retry, later
        conn.commit()
        later = str(save(g / "later.png", (1, 200, 1)))
        make_index(tmp_path / "t.db", {later: {"general": 0.9}}).close()
        assert wait_for(_thumb(tmp_path / "th", later).exists, timeout=20)
    finally:
        stop.set()
        thread.join(10)
        conn.close()


def test_an_unwritable_cache_is_one_warning_and_nothing_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g, paths, _ = _gallery(tmp_path)
    make_index(tmp_path / "t.db", {paths["red"]: {}, paths["blue"]: {}}).close()
    cache = tmp_path / "th"
    cache.write_text("a file where the cache folder should be")
    job = Job(str(tmp_path / "t.db"), str(cache), 64, 100_000, (str(g),), poll_s=0.01)
    stop, tally = threading.Event(), Tally()
    thread = threading.Thread(target=run, args=(job, stop, tally))
    with caplog.at_level("WARNING", logger="tagd.thumbs"):
        thread.start()
        try:
            assert wait_for(lambda: tally.failed == 2, timeout=20)
        finally:
            stop.set()
            thread.join(10)
    assert tally.unwritable == 2 and tally.made == 0
    warned = [r.getMessage() for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(warned) == 1 and str(cache) in warned[0]
