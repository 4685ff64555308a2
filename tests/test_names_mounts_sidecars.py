"""Issue #8 items 1, 7, 8, 18 and 20: names that are not UTF-8, control characters in names,
disks mounted below a root, sidecar modes, and force_models growing on retag.

Real files with raw byte names, real `tagd` subprocesses (stdout read as bytes, with a strict
UTF-8 stdout so nothing depends on the locale), a real SQLite file, a real tmpfs mount where
the sandbox allows one.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import save, wait_for, write_config
from onnx_models import build_wd_folder

from tagd import config as cfg
from tagd.index import db, jobs
from tagd.index.paths import upsert_path
from tagd.ingest import scanner
from tagd.ingest.watcher import Watcher, changed_mounts, mounts_under, read_mounts
from tagd.names import for_humans, json_path, to_db, tsv_field
from tagd.outputs.sidecars import write_sidecar

BAD = b"bad\xff\xfe name.png"  # not UTF-8
EVIL = b"evil\x1b[2J\x1b[31m\nforged.png"  # clears the screen, recolours, breaks the line
STRICT = {"PYTHONIOENCODING": "utf-8:strict", "LC_ALL": "C.UTF-8"}


def tagd(*args: str | bytes | Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m tagd` with bytes in and out: a raw name must reach the process and come
    back byte for byte."""
    return subprocess.run(
        [sys.executable, "-m", "tagd", *args],
        capture_output=True,
        env={**os.environ, **STRICT},
        input=stdin,
        timeout=100,
    )


def fs(path: bytes) -> str:
    return os.fsdecode(path)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A gallery with a non-UTF-8 name, a control-character name and a plain one, scanned
    and tagged once by `tagd scan` (the scan's own result is checked by the first test)."""
    base = tmp_path_factory.mktemp("names")
    model = build_wd_folder(base / "probe")
    gallery = base / "gallery"
    bad = os.path.join(os.fsencode(gallery), BAD)
    evil = os.path.join(os.fsencode(gallery), EVIL)
    save(Path(fs(bad)), (0, 0, 255))
    save(Path(fs(evil)), (0, 255, 0))
    save(gallery / "ok.png", (255, 0, 0))
    conf = write_config(
        base / "config.yaml",
        {
            "database": str(base / "state" / "tagd.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(model)}],
            "inference": {"device": "cpu", "threads": 1},
        },
    )
    scan = tagd("--config", conf, "scan")
    return {"conf": conf, "bad": bad, "evil": evil, "gallery": gallery, "scan": scan}


@pytest.mark.slow
def test_item01_non_utf8_name_is_scanned_tagged_and_searchable(indexed: dict) -> None:
    conf, bad, evil = indexed["conf"], indexed["bad"], indexed["evil"]
    scan = indexed["scan"]
    assert scan.returncode == 0, scan.stderr
    assert b"tagged 3, failed 0" in scan.stderr
    assert b"Traceback" not in scan.stderr

    paths = tagd("--config", conf, "search", "blue")
    assert paths.returncode == 0, paths.stderr
    assert paths.stdout == bad + b"\n"

    nul = tagd("--config", conf, "search", "rating:general", "-0", "--sort", "path")
    assert nul.returncode == 0, nul.stderr
    gallery = os.fsencode(indexed["gallery"])
    assert nul.stdout.split(b"\0")[:-1] == sorted([bad, evil, os.path.join(gallery, b"ok.png")])

    tsv = tagd("--config", conf, "search", "white_corner", "--format", "tsv")
    first = {line.split(b"\t")[0] for line in tsv.stdout.splitlines()}
    # raw bytes stay exact; the newline in the other name is escaped so it cannot split a row
    assert bad in first and evil.replace(b"\n", b"\\n") in first

    for fmt in ("json", "jsonl"):
        res = tagd("--config", conf, "search", "blue", "--format", fmt)
        text = res.stdout.decode("utf-8")  # strict: the output is valid UTF-8
        hit = json.loads(text)[0] if fmt == "json" else json.loads(text.splitlines()[0])
        assert base64.b64decode(hit["path_b64"]) == bad
        assert hit["path"].endswith("bad\ufffd\ufffd name.png")
    res = tagd("--config", conf, "search", "green", "--format", "json")
    (hit,) = json.loads(res.stdout.decode("utf-8"))
    assert hit["path"] == fs(evil) and "path_b64" not in hit  # valid UTF-8: exact, no extra


@pytest.mark.slow
def test_item01_non_utf8_name_show_similar_jobs_tag_store_and_exports(indexed: dict) -> None:
    conf, bad = indexed["conf"], indexed["bad"]
    show = tagd("--config", conf, "show", bad)
    assert show.returncode == 0, show.stderr
    assert b"blue" in show.stdout and b"bad\\xff\\xfe name.png" in show.stdout
    shown = json.loads(tagd("--config", conf, "show", bad, "--json").stdout.decode("utf-8"))
    assert base64.b64decode(shown["path_b64"]) == bad and len(shown["sha256"]) == 64

    similar = tagd("--config", conf, "similar", bad, "-0")
    assert similar.returncode == 0, similar.stderr
    assert len(similar.stdout.split(b"\0")[:-1]) == 2

    added = tagd("--config", conf, "jobs", "add", bad)
    assert added.returncode == 0, added.stderr
    listed = json.loads(tagd("--config", conf, "jobs", "--json").stdout.decode("utf-8"))
    assert [base64.b64decode(j["path_b64"]) for j in listed] == [bad]

    stored = tagd("--config", conf, "tag", "--model", "probe", "--store", bad)
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout.split(b"\t")[0] == bad

    jsonl = tagd("--config", conf, "export", "--format", "jsonl")
    assert jsonl.returncode == 0, jsonl.stderr
    records = [json.loads(line) for line in jsonl.stdout.decode("utf-8").splitlines()]
    raw = {base64.b64decode(r["paths_b64"][0]) for r in records if "paths_b64" in r}
    assert raw == {bad}
    exported = tagd("--config", conf, "export", "--format", "csv").stdout
    assert bad in exported

    sidecars = tagd("--config", conf, "export", "sidecars", "--style", "json")
    assert sidecars.returncode == 0, sidecars.stderr
    sidecar = json.loads(Path(fs(bad + b".json")).read_text(encoding="utf-8"))
    assert base64.b64decode(sidecar["path_b64"]) == bad
    again = tagd("--config", conf, "export", "sidecars", "--style", "json")
    assert b"0 written, 3 unchanged" in again.stderr  # tagd recognises its own sidecar


@pytest.mark.slow
def test_item07_control_characters_are_escaped_for_humans(indexed: dict, tmp_path: Path) -> None:
    conf, evil = indexed["conf"], indexed["evil"]
    broken = os.path.join(os.fsencode(indexed["gallery"]), b"x\x1b]0;pwned\x07\rbroken.png")
    Path(fs(broken)).write_bytes(b"this is text, not an image")
    try:
        scan = tagd("--config", conf, "scan")
        assert scan.returncode == 0, scan.stderr
        assert b"\x1b" not in scan.stderr and b"\x07" not in scan.stderr
        assert b"x\\x1b]0;pwned\\x07\\rbroken.png" in scan.stderr  # the failure is logged
        failed = tagd("--config", conf, "jobs", "--failed")
        assert failed.returncode == 0, failed.stderr
        (line,) = failed.stdout.splitlines()
        assert line.startswith(b"failed") and b"\x1b" not in line and b"\r" not in line
        assert b"\\x1b]0;pwned\\x07\\rbroken.png" in line
        exact = json.loads(tagd("--config", conf, "jobs", "--failed", "--json").stdout)
        assert [j["path"] for j in exact] == [fs(broken)]  # JSON keeps the exact name
        show = tagd("--config", conf, "show", evil)
        assert show.stdout.splitlines()[0].endswith(b"evil\\x1b[2J\\x1b[31m\\nforged.png")
        missing = tagd("--config", conf, "show", os.fsencode(tmp_path) + b"/\x1b[2Jgone.png")
        assert missing.returncode == 1 and b"\x1b" not in missing.stderr
        assert b"\\x1b[2Jgone.png is not in the index" in missing.stderr
    finally:
        os.unlink(broken)


def test_item07_for_humans_escapes_controls_bidi_and_raw_bytes() -> None:
    assert for_humans("plain/ü ñ.jpg") == "plain/ü ñ.jpg"
    assert for_humans(fs(b"a\x1b[2Jb\nc\td\x7f\xc2\x9be\xff")) == (
        "a\\x1b[2Jb\\nc\\td\\x7f\\x9be\\xff"
    )
    assert for_humans("evil\u202egpj.exe") == "evil\\u202egpj.exe"
    assert for_humans("bad query:\n  ^", keep_newlines=True) == "bad query:\n  ^"
    assert tsv_field("a\tb\nc\\d") == "a\\tb\\nc\\\\d"
    assert json_path(fs(b"/g/\xff.png")) == {
        "path": "/g/\ufffd.png",
        "path_b64": base64.b64encode(b"/g/\xff.png").decode(),
    }


def test_item01_raw_names_round_trip_in_sqlite_and_match_folder_ranges(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "t.db")
    try:
        names = [fs(b"/g/sub/\xff.png"), fs(b"/g/sub/\xc3.png"), "/g/sub/ü.png", "/g/other.png"]
        with db.write(conn):
            for i, p in enumerate(names):
                upsert_path(conn, p, None, i, i)
                jobs.enqueue(conn, p, i, i)
        got = [r[0] for r in conn.execute("SELECT path FROM paths ORDER BY id")]
        assert got == names and [os.fsencode(p) for p in got] == [os.fsencode(p) for p in names]
        assert [j.path for j in jobs.claim(conn, "me", 10)] == names
        # the folder range of a scan covers raw names too: none of /g/sub was seen again
        assert scanner.mark_missing(conn, "/g/sub", time.time() + 1) == 3
        raw = conn.execute("SELECT CAST(path AS BLOB) FROM paths WHERE id = 1").fetchone()[0]
        assert raw == b"/g/sub/\xff.png"  # stored as the exact bytes, readable by sqlite3
    finally:
        conn.close()


def _conf(tmp_path: Path, gallery: Path, probe: Path) -> cfg.Config:
    return cfg.parse(
        {
            "database": str(tmp_path / "t.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe)}],
            "inference": {"device": "cpu", "threads": 1},
            "daemon": {"settle_seconds": 0.3},
        },
        base=tmp_path,
    )


@pytest.fixture
def watched(tmp_path: Path, gallery: Path, probe_model: Path) -> Iterator[tuple]:
    conf = _conf(tmp_path, gallery, probe_model)
    conn = db.connect(conf.database)
    w = Watcher(conf.database, conf)
    w.mountinfo = str(tmp_path / "mountinfo")  # replaced by the real one where a test mounts
    Path(w.mountinfo).write_text("")
    try:
        yield w, conn
    finally:
        w.stop()
        conn.close()


def _job_paths(conn: sqlite3.Connection) -> set[bytes]:
    return {os.fsencode(r[0]) for r in conn.execute("SELECT path FROM jobs")}


def _missing(conn: sqlite3.Connection) -> dict[str, int]:
    return {r[0]: r[1] for r in conn.execute("SELECT path, missing FROM paths")}


def test_item01_watcher_survives_non_utf8_names(watched: tuple, gallery: Path) -> None:
    w, conn = watched
    w.start()
    bad = os.path.join(os.fsencode(gallery), BAD)
    save(Path(fs(bad)), (1, 2, 3))
    wait_for(lambda: bad in _job_paths(conn), timeout=20)
    moved = os.path.join(os.fsencode(gallery), b"sub\xfe", b"moved\xff.png")
    os.makedirs(os.path.dirname(moved))
    os.rename(bad, moved)
    wait_for(lambda: _job_paths(conn) == {moved}, timeout=20)
    os.rename(os.path.dirname(moved), os.path.join(os.fsencode(gallery), b"dir\xfd"))
    renamed = os.path.join(os.fsencode(gallery), b"dir\xfd", b"moved\xff.png")
    wait_for(lambda: _job_paths(conn) == {renamed}, timeout=20)
    assert w.alive() and w.last_error is None


def test_item08_mountinfo_changes_below_a_root_rescan_that_folder(
    watched: tuple, gallery: Path
) -> None:
    """The detection on a written mountinfo file (no mount needed), the rescan on real dirs."""
    w, conn = watched
    info = Path(w.mountinfo)
    sub = gallery / "sub dir"
    keep = save(sub / "keep.png", (9, 9, 9))
    with db.write(conn):
        upsert_path(conn, str(keep), None, 1, 1)
        upsert_path(conn, str(sub / "hidden.png"), None, 1, 1)  # gone from the folder
        upsert_path(conn, str(gallery / "elsewhere.png"), None, 1, 1)
    point = str(sub).replace(" ", "\\040")  # as the kernel escapes a space
    w.start()
    info.write_text(f"40 27 0:99 / {point} rw,relatime - tmpfs none rw\n")
    wait_for(lambda: _missing(conn)[str(sub / "hidden.png")] == 1, timeout=20)
    assert _missing(conn)[str(keep)] == 0 and _missing(conn)[str(gallery / "elsewhere.png")] == 0
    assert os.fsencode(keep) in _job_paths(conn)
    assert read_mounts(str(info)) == {str(sub): "40 0:99 /"}
    assert w.alive() and w.last_error is None


def test_item08_mount_points_parse_and_change_outermost_first(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_bytes(
        b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        b"2 1 0:5 / /g/a\\040b rw - tmpfs none rw\n"
        b"3 2 0:6 / /g/a\\040b/c rw - tmpfs none rw\n"
        b"4 1 0:7 / /gallery2 rw - tmpfs none rw\n"
        b"5 1 0:8 / /g/\xff rw - tmpfs none rw\n"
    )
    mounts = read_mounts(str(info))
    assert mounts is not None
    below = mounts_under(mounts, "/g")
    assert sorted(below) == sorted(["/g/a b", "/g/a b/c", fs(b"/g/\xff")])
    assert changed_mounts({}, below) == sorted(["/g/a b", fs(b"/g/\xff")])
    assert changed_mounts(below, {**below, "/g/a b/c": "9 0:9 /"}) == ["/g/a b/c"]
    assert changed_mounts(below, below) == []
    assert read_mounts(str(tmp_path / "absent")) is None


def _can_mount(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "tagd-test", str(where)], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


@pytest.mark.slow
def test_item08_real_tmpfs_mounted_below_a_root_is_noticed(watched: tuple, gallery: Path) -> None:
    w, conn = watched
    w.mountinfo = "/proc/self/mountinfo"
    sub = gallery / "sub"
    hidden = [save(sub / f"h{i}.png", (i, i, i)) for i in range(3)]
    with db.write(conn):
        for p in hidden:
            upsert_path(conn, str(p), None, 1, 1)
    w.start()
    if not _can_mount(sub):
        pytest.skip("mount -t tmpfs is not permitted here (the mountinfo test covers detection)")
    try:
        wait_for(lambda: all(_missing(conn)[str(p)] == 1 for p in hidden), timeout=20)
        new = save(sub / "on-the-mount.png", (7, 7, 7))  # the rewatched root sees it
        wait_for(lambda: os.fsencode(new) in _job_paths(conn), timeout=20)
    finally:
        subprocess.run(["umount", str(sub)], capture_output=True, timeout=10)
    wait_for(lambda: all(_missing(conn)[str(p)] == 0 for p in hidden), timeout=20)
    assert w.alive() and w.last_error is None


@pytest.mark.parametrize(
    ("image_mode", "umask", "expected"),
    [
        (0o600, 0o022, 0o600),
        (0o644, 0o027, 0o640),
        (0o644, 0o022, 0o644),
        (0o755, 0o002, 0o644),
        (0o664, 0o002, 0o664),
    ],
)
def test_item18_sidecar_mode_follows_umask_and_is_never_more_open_than_the_image(
    tmp_path: Path, image_mode: int, umask: int, expected: int
) -> None:
    image = save(tmp_path / "img.png", (1, 1, 1))
    os.chmod(image, image_mode)
    conn = db.connect(tmp_path / "t.db")
    old = os.umask(umask)
    try:
        with db.write(conn):
            write_sidecar(conn, tmp_path / "img.png.txt", "a\n", image=image)
    finally:
        os.umask(old)
        conn.close()
    assert (tmp_path / "img.png.txt").stat().st_mode & 0o777 == expected


@pytest.mark.slow
def test_item18_export_sidecars_of_a_private_image_stay_private(indexed: dict) -> None:
    conf, gallery = indexed["conf"], indexed["gallery"]
    image = gallery / "ok.png"
    os.chmod(image, 0o600)
    try:
        res = tagd("--config", conf, "export", "sidecars", "path:*/ok.png", "--style", "hydrus")
        assert res.returncode == 0, res.stderr
        assert (gallery / "ok.png.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.chmod(image, 0o644)


def test_item20_force_models_stay_deduplicated(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "t.db")
    try:
        with db.write(conn):
            for _ in range(4):
                jobs.enqueue(conn, "/g/a.png", 1, 1, force_models=("probe",), requeue=True)
        assert conn.execute("SELECT force_models FROM jobs").fetchone()[0] == "probe"
        with db.write(conn):
            jobs.enqueue(conn, "/g/a.png", 1, 1, force_models=("other", "probe"), requeue=True)
        (job,) = jobs.claim(conn, "me", 5)
        assert job.force_models == ("other", "probe")
        # an older database that already holds duplicates reads back without them
        conn.execute("UPDATE jobs SET state = 'queued', force_models = 'probe,probe,x,probe'")
        (job,) = jobs.claim(conn, "me", 5)
        assert job.force_models == ("probe", "x")
    finally:
        conn.close()


@pytest.mark.slow
def test_item20_retag_all_twice_names_the_model_once(indexed: dict) -> None:
    conf = indexed["conf"]
    for _ in range(3):
        assert tagd("--config", conf, "retag", "--model", "probe", "--all").returncode == 0
    database = Path(cfg.load(str(conf)).database)
    with sqlite3.connect(database) as c:
        c.text_factory = bytes
        forced = [r[0] for r in c.execute("SELECT force_models FROM jobs WHERE force_models != ''")]
    assert forced == [b"probe"] * 3


def test_item01_to_db_keeps_valid_names_as_text() -> None:
    assert to_db("/g/ü.png") == "/g/ü.png"
    assert to_db(fs(b"/g/\xff.png")) == b"/g/\xff.png"


def test_item01_errors_and_state_quoting_a_raw_name_are_stored(tmp_path: Path) -> None:
    """The daemon records `path: reason` as its last error and a failure reason per job; a
    raw name in either used to raise in the worker thread."""
    conn = db.connect(tmp_path / "t.db")
    name = fs(b"/g/\xff.png")
    try:
        with db.write(conn):
            jobs.enqueue(conn, name, 1, 1)
            db.set_state(conn, "last_error", f"{name}: cannot identify image")
        (job,) = jobs.claim(conn, "me", 1)
        with db.write(conn):
            jobs.fail(conn, job, "me", f"cannot open {name}", transient=False)
        assert db.get_state(conn, "last_error") == "/g/\\xff.png: cannot identify image"
        (row,) = jobs.listing(conn, "failed")
        assert row["error"] == "cannot open /g/\\xff.png" and row["path"] == name
    finally:
        conn.close()
