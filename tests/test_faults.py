"""Issue #8, "nothing a gallery holds can stop tagd": full disks, locked and broken databases,
unreadable models and hostile queries end in one line and, for the daemon, a wait, never a
traceback or a dead service. Real processes, real SQLite files, a real full filesystem."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_tagd, save, wait_for, write_config


@pytest.fixture
def notify_socket() -> Iterator[socket.socket]:
    folder = tempfile.mkdtemp(prefix="tagd-")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(os.path.join(folder, "n.sock"))
    sock.setblocking(False)
    yield sock
    sock.close()
    os.unlink(os.path.join(folder, "n.sock"))
    os.rmdir(folder)


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB filesystem, so "database or disk is full" comes from the kernel."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def status(config: Path) -> dict:
    r = run_tagd("-c", str(config), "status", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode in (1, 2, 3), (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.slow
def test_item10_disk_full_daemon_survives(
    tmp_path: Path, gallery: Path, probe_model: Path, small_disk: Path, notify_socket
) -> None:
    for i in range(2):
        save(gallery / f"a{i}.png", (40 * i, 90, 200))
    database = small_disk / "tagd.db"
    config = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(database),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
            "daemon": {"settle_seconds": 0.2},
        },
    )
    assert run_tagd("-c", str(config), "scan").returncode == 0
    log = tmp_path / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket.getsockname()}
    env.pop("WATCHDOG_PID", None)
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tagd", "-c", str(config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
    try:
        wait_for(lambda: status(config)["daemon"] == "running", timeout=60)
        # An empty WAL, then not a byte left: the next write has nowhere to go.
        conn = sqlite3.connect(database, timeout=10)
        wait_for(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0)
        conn.close()
        filler = fill(small_disk)
        for i in range(3):
            save(gallery / f"b{i}.png", (200, 30 * i, 20))

        r = wait_for(
            lambda: (s := status(config))["database_error"] and s["daemon"] == "running" and s
        )
        assert "database or disk is full" in r["database_error"]
        text = run_tagd("-c", str(config), "status").stdout
        assert "database or disk is full" in text and "retrying" in text
        seen: list[str] = []
        wait_for(
            lambda: (
                seen.extend(drain(notify_socket))
                or any("STATUS=" in m and "database or disk is full" in m for m in seen)
            )
        )
        for args in (("jobs", "add", str(gallery / "b0.png")), ("scan", "--no-tag")):
            line = one_line_error(run_tagd("-c", str(config), *args))
            assert "database or disk is full" in line and "free space" in line, line
        assert proc.poll() is None, log.read_text()

        filler.unlink()
        wait_for(
            lambda: (
                (s := status(config))["jobs"]["done"] == 5
                and s["jobs"]["running"] == 0
                and not s["database_error"]
            ),
            timeout=60,
        )
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
    text = log.read_text()
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert "database or disk is full" in text


def test_item10_sqlite_rollback_reports_real_error(tmp_path: Path) -> None:
    """SQLite rolls a transaction back by itself on SQLITE_FULL; a second ROLLBACK used to
    replace "database or disk is full" with "no transaction is active"."""
    from tagd.index import db

    conn = db.connect(tmp_path / "t.db")
    conn.execute("CREATE TABLE big(b BLOB)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 2}")
    with (
        pytest.raises(sqlite3.OperationalError, match="database or disk is full"),
        db.write(conn),
    ):
        conn.execute("INSERT INTO big VALUES (zeroblob(10))")
        conn.execute("INSERT INTO big VALUES (zeroblob(100000))")
    assert not conn.in_transaction
    with db.write(conn):
        conn.execute("INSERT INTO big VALUES (zeroblob(10))")
    assert conn.execute("SELECT count(*) FROM big").fetchone()[0] == 1
    conn.close()


def test_item10_locked_database_is_trouble_not_death(tmp_path: Path) -> None:
    """A write lock held past the busy timeout: the daemon's backoff records it in words."""
    from tagd.index import db, jobs
    from tagd.index.dberrors import DatabaseTrouble

    path = tmp_path / "t.db"
    db.connect(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    conn = db.connect(path)
    conn.execute("PRAGMA busy_timeout = 50")
    trouble = DatabaseTrouble()
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            jobs.set_paused(conn, True)
        first = trouble.failed(caught.value, path)
        second = trouble.failed(caught.value, path)
        assert second == 2 * first and trouble.waiting() > 0
        assert trouble.error is not None and "database is locked" in trouble.error
        assert str(path) in trouble.error and "busy timeout" in trouble.error
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    jobs.set_paused(conn, True)
    assert trouble.cleared() and not trouble.active and trouble.waiting() == 0
    conn.close()


def model_config(tmp_path: Path, gallery: Path, model: Path, database: Path | None = None) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        {
            "database": str(database or tmp_path / "state" / "tagd.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(model)}],
            "inference": {"device": "cpu"},
        },
    )


def copy_model(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


@pytest.mark.slow
def test_item11_empty_model_file_is_one_line(tmp_path: Path, gallery: Path, probe_model: Path):
    model = copy_model(probe_model, tmp_path / "m")
    (model / "model.onnx").write_bytes(b"")
    save(gallery / "a.png", (1, 2, 3))
    config = model_config(tmp_path, gallery, model)
    for args in (("scan",), ("tag", "--model", "probe", str(gallery / "a.png"))):
        line = one_line_error(run_tagd("-c", str(config), *args))
        assert str(model / "model.onnx") in line and "empty (0 bytes)" in line, line


def test_item11_unreadable_model_file_is_one_line(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    model = copy_model(probe_model, tmp_path / "m")
    (model / "model.onnx").unlink()
    (model / "model.onnx").mkdir()  # root reads any file; a directory still cannot be read
    save(gallery / "a.png", (1, 2, 3))
    line = one_line_error(run_tagd("-c", str(model_config(tmp_path, gallery, model)), "scan"))
    assert str(model / "model.onnx") in line and "cannot be read" in line, line


@pytest.mark.slow
def test_item11_run_on_a_file_that_is_not_a_database(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database\n" * 40)
    config = model_config(tmp_path, gallery, probe_model, database=bogus)
    for args in (("run",), ("scan",), ("status",)):
        r = run_tagd("-c", str(config), *args)
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        errors = [x for x in r.stderr.splitlines() if x.startswith("tagd:")]
        assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
        assert str(bogus) in errors[0] and "not a database" in errors[0], errors[0]
        assert errors[0].count(str(bogus)) == 1, errors[0]
    assert bogus.read_text().startswith("these are my notes")


@pytest.fixture(scope="module")
def tagged_index(tmp_path_factory: pytest.TempPathFactory, probe_model: Path) -> Path:
    """One small index shared by the read-only CLI tests below (a scan costs seconds)."""
    tmp_path = tmp_path_factory.mktemp("indexed")
    gallery = tmp_path / "gallery"
    save(gallery / "red.png", (250, 5, 5))
    save(gallery / "blue.png", (5, 5, 250))
    config = model_config(tmp_path, gallery, probe_model)
    assert run_tagd("-c", str(config), "scan").returncode == 0
    return config


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (("--limit", "0"), "--limit 0"),
        (("--limit", "-3"), "--limit -3"),
        (("--offset", "99999999999999999999999"), "--offset 99999999999999999999999"),
        (("--limit", "5", "--offset", "-1"), "--offset -1"),
    ],
)
def test_item11_search_limit_and_offset_out_of_range(
    tagged_index: Path, flags: tuple[str, ...], named: str
) -> None:
    r = run_tagd("-c", str(tagged_index), "search", "red", *flags)
    line = one_line_error(r)
    assert r.returncode == 2 and named in line, line


def test_item11_top_page_of_zero_rows(tagged_index: Path) -> None:
    from tagd.config import load
    from tagd.index import db
    from tagd.search.execute import search
    from tagd.search.query import parse
    from tagd.search.types import SearchOptions

    conn = db.connect(load(str(tagged_index)).database, readonly=True)
    assert list(search(conn, parse("red"), SearchOptions(limit=0))) == []
    assert [h.path for h in search(conn, parse("red"), SearchOptions(limit=1))]
    conn.close()


def test_item11_unexpected_error_is_one_line_with_hint(tmp_path: Path) -> None:
    """The last resort in cli.main: an exception no command expected (here a KeyError raised
    inside the command) is one line plus a hint; -v logs the traceback."""
    plugin = tmp_path / "boom"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(
        "import tagd.commands.stats as s\n"
        "def run(ctx):\n    raise KeyError('surprise')\n"
        "s.run = run\n"
    )
    env = {"PYTHONPATH": f"{plugin}{os.pathsep}{os.environ['PYTHONPATH']}"}
    r = run_tagd("stats", env=env)
    line = one_line_error(r)
    assert r.returncode == 3 and "KeyError" in line and "surprise" in line and "-v" in line
    verbose = run_tagd("-v", "stats", env=env)
    assert "Traceback" in verbose.stderr and verbose.returncode == 3


@pytest.mark.parametrize(
    "words",
    [
        ["-character:* rating:*"],
        ["-character:*", "rating:*"],
        ["-(red | character:*) rating:*"],
        ["-(red", "|", "character:*)", "rating:*"],
        ["-red", "--format", "tsv", "rating:*"],
        ["-red", "-0", "rating:*"],
        ["--limit", "5", "-red", "rating:*"],
    ],
)
def test_item13_query_starting_with_dash(tagged_index: Path, words: list[str]) -> None:
    r = run_tagd("-c", str(tagged_index), "search", *words)
    assert r.returncode == 0, r.stderr
    out = r.stdout.replace("\0", "\n")
    assert "blue.png" in out and "red.png" not in out, out


@pytest.mark.parametrize(
    "words", [["-character:*"], ["-(red | character:*)"], ["-(red", "|", "character:*)"]]
)
def test_item13_only_exclusions_reach_the_query_parser(
    tagged_index: Path, words: list[str]
) -> None:
    """The forms from the issue: argparse used to answer "the following arguments are
    required: query"; now the query parser answers, with its caret."""
    r = run_tagd("-c", str(tagged_index), "search", *words)
    assert r.returncode == 2 and "required" not in r.stderr, r.stderr
    assert "not only exclusions" in r.stderr and "^" in r.stderr


@pytest.mark.parametrize(
    "words",
    [
        ["(" * 500 + "red" + ")" * 500],
        [" | ".join(["red"] * 20_000)],  # one argument stays under 128 KiB
        ["red"] * 20_000,
    ],
)
def test_item12_cli_hostile_query_exits_2_with_a_short_caret(
    tagged_index: Path, words: list[str]
) -> None:
    r = run_tagd("-c", str(tagged_index), "search", *words)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[:500]
    lines = r.stderr.splitlines()
    assert len(lines) == 3 and all(len(x) < 120 for x in lines), lines
    assert lines[2].lstrip().startswith("^")


def _rows(database: Path) -> dict[str, object]:
    """Everything a model's result leaves in the index, keyed by content, not by row ids."""
    conn = sqlite3.connect(database)
    try:
        scores = conn.execute(
            "SELECT f.sha256, m.name, t.namespace, t.name, s.score, s.selected FROM scores s "
            "JOIN files f ON f.id = s.file_id JOIN models m ON m.id = s.model_id "
            "JOIN tags t ON t.id = s.tag_id ORDER BY 1, 2, 3, 4"
        ).fetchall()
        embeddings = conn.execute(
            "SELECT f.sha256, m.name, e.dim, e.dtype, e.vector FROM embeddings e "
            "JOIN files f ON f.id = e.file_id JOIN models m ON m.id = e.model_id ORDER BY 1, 2"
        ).fetchall()
        taggings = conn.execute(
            "SELECT f.sha256, m.name, t.revision, t.floor FROM taggings t "
            "JOIN files f ON f.id = t.file_id JOIN models m ON m.id = t.model_id ORDER BY 1, 2"
        ).fetchall()
        files = conn.execute(
            "SELECT sha256, size, width, height, format FROM files ORDER BY sha256"
        ).fetchall()
    finally:
        conn.close()
    return {"scores": scores, "embeddings": embeddings, "taggings": taggings, "files": files}


@pytest.mark.slow
def test_item14_tag_store_writes_what_scan_writes(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    save(gallery / "red.png", (250, 5, 5))
    save(gallery / "blue.png", (5, 5, 250))
    save(gallery / "mixed.png", (200, 30, 160))

    def config(name: str) -> Path:
        return write_config(
            tmp_path / f"{name}.yaml",
            {
                "database": str(tmp_path / name / "tagd.db"),
                "watch": [{"path": str(gallery)}],
                "models": [{"name": "probe", "path": str(probe_model)}],
                # ONNX Runtime's sums differ in the last digits between batch shapes; one
                # image per batch either way, so any difference left is tagd's.
                "inference": {"device": "cpu", "batch_size": 1},
                "tags": {
                    "blacklist": ["red"],
                    "aliases": {"blue": "azure", "character:crimson_knight": "character:knight"},
                },
            },
        )

    scanned, stored = config("scanned"), config("stored")
    assert run_tagd("-c", str(scanned), "scan").returncode == 0
    images = sorted(str(p) for p in gallery.iterdir())
    r = run_tagd("-c", str(stored), "tag", "--model", "probe", "--store", *images)
    assert r.returncode == 0, r.stderr
    a, b = _rows(tmp_path / "scanned" / "tagd.db"), _rows(tmp_path / "stored" / "tagd.db")
    assert a["scores"] and a["embeddings"] and len(a["taggings"]) == 3
    assert a == b
    selected = {(ns, name) for _, _, ns, name, _, sel in b["scores"] if sel}  # type: ignore[union-attr]
    assert ("general", "red") not in selected and ("general", "azure") in selected
    assert ("general", "blue") not in selected
    # What `tag` prints follows the same rules: no blacklisted tag, aliases applied.
    printed = {line.split("\t")[1] for line in r.stdout.splitlines()}
    assert "red" not in printed and "blue" not in printed and "azure" in printed
    # A later scan finds nothing to redo, and reindex (the same decision from stored scores)
    # changes nothing either.
    assert run_tagd("-c", str(stored), "scan").returncode == 0
    assert run_tagd("-c", str(stored), "reindex").returncode == 0
    assert _rows(tmp_path / "stored" / "tagd.db") == b


def test_item10_daemon_rides_out_a_lock_held_past_the_busy_timeout(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    """The supervising loop's status write meets a real lock (another connection's BEGIN
    EXCLUSIVE): the error is reported in the health file and `tagd status`, retried with
    backoff, and cleared by the first write that works; nothing raises."""
    from tagd.config import load
    from tagd.index import status
    from tagd.service.daemon import Daemon

    config_path = model_config(tmp_path, gallery, probe_model)
    config = load(str(config_path))
    daemon = Daemon(config, [])
    daemon.conn.execute("PRAGMA busy_timeout = 50")
    holder = sqlite3.connect(config.database, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        line = daemon.supervise_database(time.monotonic())
        assert line is not None and "database is locked" in line and "next try in 2 s" in line
        assert daemon.supervise_database(time.monotonic()) is None  # backing off
        health = status.read_health(config.database)
        assert "database is locked" in health["database_error"]
        assert health["pid"] == os.getpid() and not health["stopped"]
        holder.execute("ROLLBACK")
        reader = sqlite3.connect(f"file:{config.database}?mode=ro", uri=True)
        reader.row_factory = sqlite3.Row
        report = status.report(reader, database=config.database)
        reader.close()
        assert report["daemon"] == "running" and "database is locked" in report["database_error"]
        wait_for(lambda: daemon.supervise_database(time.monotonic()) is not None, timeout=10)
        assert not daemon.trouble.active
        assert status.read_health(config.database)["database_error"] is None
    finally:
        holder.close()
        daemon.health.close()
        daemon.conn.close()
