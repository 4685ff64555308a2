"""The watcher on real inotify/polling events in temp folders, writing to a real SQLite file."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import save, wait_for

from tagd import config as cfg
from tagd.index import db
from tagd.ingest.watcher import Watcher, inotify_limit_message
from tagd.tagging import tagger
from tagd.tagging.pipeline import Pipeline

SETTLE = 0.6


def make_config(tmp_path: Path, gallery: Path, probe_model: Path, **root: object) -> cfg.Config:
    return cfg.parse(
        {
            "database": str(tmp_path / "t.db"),
            "watch": [{"path": str(gallery), **root}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu", "threads": 1},
            "daemon": {"settle_seconds": SETTLE},
        },
        base=tmp_path,
    )


@pytest.fixture
def conf(tmp_path: Path, gallery: Path, probe_model: Path) -> cfg.Config:
    return make_config(tmp_path, gallery, probe_model)


@pytest.fixture
def conn(conf: cfg.Config) -> Iterator[sqlite3.Connection]:
    c = db.connect(conf.database)
    yield c
    c.close()


@pytest.fixture
def watcher(conf: cfg.Config, conn: sqlite3.Connection) -> Iterator[Watcher]:
    back: list[str] = []
    w = Watcher(conf.database, conf, on_root_back=lambda root: back.append(str(root.path)))
    w.came_back = back  # type: ignore[attr-defined]
    w.start()
    yield w
    w.stop()


def job(conn: sqlite3.Connection, path: Path) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM jobs WHERE path = ?", (str(path),)).fetchone()


def present(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT path FROM paths WHERE missing = 0")}


def tag_queue(conf: cfg.Config) -> None:
    c = db.connect(conf.database)
    try:
        with Pipeline(c, conf, tagger.load_all(conf)) as pipeline:
            pipeline.run()
    finally:
        c.close()


def test_copy_in_is_queued_and_own_reads_make_no_events(
    watcher: Watcher, conn: sqlite3.Connection, gallery: Path, tmp_path: Path
) -> None:
    src = save(tmp_path / "outside" / "a.png", (200, 10, 10))
    shutil.copy(src, gallery / "a.png")
    save(gallery / "skip.png.part", (1, 1, 1), format="PNG")
    save(gallery / ".hidden" / "b.png", (1, 1, 1))
    row = wait_for(lambda: job(conn, gallery / "a.png"))
    assert row["state"] == "queued" and row["size"] == src.stat().st_size
    # tagd reading the file (open + close without writing) must not queue anything again
    before = conn.execute("SELECT updated_at FROM jobs").fetchall()
    (gallery / "a.png").read_bytes()
    # A file written after the read settles after any event the read could have caused.
    save(gallery / "marker.png", (3, 3, 3))
    wait_for(lambda: job(conn, gallery / "marker.png"))
    assert (
        conn.execute(
            "SELECT updated_at FROM jobs WHERE path = ?", (str(gallery / "a.png"),)
        ).fetchall()
        == before
    )
    assert sorted(r[0] for r in conn.execute("SELECT path FROM jobs")) == [
        str(gallery / "a.png"),
        str(gallery / "marker.png"),
    ]


def test_slow_chunked_write_is_queued_only_when_complete(
    watcher: Watcher, conn: sqlite3.Connection, gallery: Path, tmp_path: Path
) -> None:
    data = save(tmp_path / "big.png", (10, 200, 10), size=(300, 300)).read_bytes()
    target = gallery / "slow.png"
    chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    checked = 0
    with open(target, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            written = time.monotonic()
            time.sleep(SETTLE / 3)
            # Only a pause shorter than the settle time proves anything: on a loaded machine
            # this thread may stall past it, and then the watcher may rightly queue the file.
            if time.monotonic() - written < SETTLE * 0.8:
                assert job(conn, target) is None, "queued while half written"
                checked += 1
    assert checked > 0, "the machine was too loaded to write any chunk within the settle time"
    row = wait_for(lambda: job(conn, target))
    assert row["size"] == len(data)


def test_created_file_settles_without_close_event(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    conf = make_config(tmp_path, gallery, probe_model, polling=True, poll_interval=0.2)
    w = Watcher(conf.database, conf)
    w.start()
    try:
        assert w.health() == {str(gallery): "polling"}
        conn = db.connect(conf.database)
        save(gallery / "sub" / "p.png", (5, 5, 5))
        started = time.monotonic()
        row = wait_for(lambda: job(conn, gallery / "sub" / "p.png"))
        assert time.monotonic() - started >= SETTLE
        assert row["state"] == "queued"
    finally:
        w.stop()


def test_subfolder_tree_is_queued(
    watcher: Watcher, conn: sqlite3.Connection, gallery: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "incoming"
    for i in range(3):
        save(outside / "x" / f"{i}.png", (i, 0, 0))
    save(outside / "x" / "y" / "deep.png", (9, 9, 9))
    for i in range(2):
        save(gallery / "new" / "a" / "b" / f"{i}.png", (0, i, 0))
    shutil.move(str(outside), str(gallery / "moved-in"))
    expected = {
        *(str(gallery / "moved-in" / "x" / f"{i}.png") for i in range(3)),
        str(gallery / "moved-in" / "x" / "y" / "deep.png"),
        *(str(gallery / "new" / "a" / "b" / f"{i}.png") for i in range(2)),
    }
    wait_for(lambda: {r[0] for r in conn.execute("SELECT path FROM jobs")} == expected)


def test_move_rename_delete_keep_tags(
    conf: cfg.Config, watcher: Watcher, conn: sqlite3.Connection, gallery: Path
) -> None:
    (gallery / "album").mkdir()
    a = save(gallery / "a.png", (200, 0, 0))
    b = save(gallery / "b.png", (0, 0, 200))
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2)
    tag_queue(conf)
    tagged = conn.execute("SELECT file_id, tagged_at FROM taggings ORDER BY file_id").fetchall()
    assert len(tagged) == 2
    renamed = gallery / "renamed.png"
    a.rename(renamed)
    moved = gallery / "album" / "b.png"
    b.rename(moved)
    wait_for(lambda: present(conn) == {str(renamed), str(moved)})
    assert conn.execute("SELECT count(*) FROM jobs WHERE state != 'done'").fetchone()[0] == 0
    tag_queue(conf)
    after = conn.execute("SELECT file_id, tagged_at FROM taggings ORDER BY file_id").fetchall()
    assert [tuple(r) for r in after] == [tuple(r) for r in tagged]
    album2 = gallery / "album2"
    (gallery / "album").rename(album2)
    wait_for(lambda: present(conn) == {str(renamed), str(album2 / "b.png")})
    renamed.unlink()
    wait_for(lambda: present(conn) == {str(album2 / "b.png")})
    assert job(conn, renamed) is None
    missing = conn.execute("SELECT path FROM paths WHERE missing = 1").fetchall()
    assert [r[0] for r in missing] == [str(renamed)]
    assert conn.execute("SELECT count(*) FROM jobs WHERE state != 'done'").fetchone()[0] == 0


@pytest.mark.slow
def test_unmounted_root_is_not_marked_missing(
    conf: cfg.Config, watcher: Watcher, conn: sqlite3.Connection, gallery: Path, tmp_path: Path
) -> None:
    for i in range(3):
        save(gallery / f"{i}.png", (i * 50, 0, 0))
    wait_for(lambda: conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 3)
    tag_queue(conf)
    elsewhere = tmp_path / "unplugged"
    gallery.rename(elsewhere)
    gallery.mkdir()  # the empty mount point left behind
    back: list[str] = watcher.came_back  # type: ignore[attr-defined]
    wait_for(lambda: back == [str(gallery)])
    assert conn.execute("SELECT count(*) FROM paths WHERE missing = 1").fetchone()[0] == 0
    gallery.rmdir()
    elsewhere.rename(gallery)
    wait_for(lambda: len(back) == 2 and watcher.health()[str(gallery)] == "inotify")
    save(gallery / "after.png", (1, 2, 3))
    wait_for(lambda: job(conn, gallery / "after.png"))
    assert conn.execute("SELECT count(*) FROM paths WHERE missing = 1").fetchone()[0] == 0


EXHAUST = """
import logging, os, resource, sys, json
from tagd import config as cfg
from tagd.ingest.watcher import Watcher

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

class Restore(logging.Handler):
    # inotify failed for real; give the polling fallback its file descriptors back
    def emit(self, record):
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

logging.getLogger("tagd.ingest.watcher").addHandler(Restore())
conf = cfg.parse({"database": sys.argv[1], "watch": [sys.argv[2]]}, base=os.getcwd())
w = Watcher(conf.database, conf)
spare = os.dup(0)
os.close(spare)
resource.setrlimit(resource.RLIMIT_NOFILE, (spare, hard))
w.start()
print(json.dumps([w.health(), w.last_error]))
w.stop()
"""


def test_inotify_exhaustion_falls_back_to_polling(tmp_path: Path, gallery: Path) -> None:
    """A fresh process whose inotify instance cannot be created (EMFILE, as when
    fs.inotify.max_user_instances is used up) polls the root instead, and says which sysctl."""
    out = subprocess.run(
        [sys.executable, "-c", EXHAUST, str(tmp_path / "t.db"), str(gallery)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    health, error = json.loads(out.stdout)
    assert health == {str(gallery): "polling (inotify limit reached)"}
    assert "fs.inotify.max_user_instances" in error and "60-tagd-inotify.conf" in error
    msg = inotify_limit_message("/g", OSError(errno.ENOSPC, "inotify watch limit reached"))
    assert "fs.inotify.max_user_watches" in msg
