"""`tagd scan/search/show` as a user runs them: real subprocesses, SQLite file, ONNX session.

The probe model's tags reveal preprocessing: `red` only lights up when the red channel is fed
last (BGR), `white_corner` only when the padding is white and values are 0-255, `bright` only
on the 0-255 scale.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config
from PIL import Image


def _gallery(g: Path) -> dict[str, Path]:
    return {
        # wide: padded with white above and below, so the corner is white
        "red": save(g / "red.jpg", (255, 0, 0), (300, 100), quality=95),
        "blue": save(g / "sub" / "blue.png", (0, 0, 255), (120, 120)),
        "green": save(g / "green.webp", (0, 255, 0), (50, 150), lossless=True),
        "white": save(g / "white.png", (250, 250, 250), (80, 80)),
    }


def _lines(out: str) -> set[str]:
    return {line for line in out.splitlines() if line}


@pytest.mark.slow
def test_scan_search_show(config_file: Path, gallery: Path) -> None:
    files = _gallery(gallery)
    r = run_tagd("--config", str(config_file), "scan")
    assert r.returncode == 0, r.stderr
    assert "tagged 4, failed 0" in r.stderr
    db = config_file.parent / "state" / "tagd.db"
    meta = json.loads(Path(f"{db}.rank.json").read_text())
    with sqlite3.connect(db) as conn:
        seq, logged = conn.execute("SELECT max(seq), count(*) FROM score_changes").fetchone()
    assert meta["seq"] == seq and logged == 4  # the ranking cache is current after a scan
    assert meta["tags"] == []  # no tag is on enough files to need a column

    def search(*q: str) -> tuple[int, set[str]]:
        res = run_tagd("--config", str(config_file), "search", *q)
        return res.returncode, _lines(res.stdout)

    assert search("red") == (0, {str(files["red"])})
    assert search("blue") == (0, {str(files["blue"])})
    white_corner = {str(files["red"]), str(files["green"]), str(files["white"])}
    assert search("white_corner") == (0, white_corner)
    assert search("white_corner -red") == (0, {str(files["green"]), str(files["white"])})
    assert search("bright") == (0, {str(files["white"])})
    assert search("character:crimson_knight") == (0, {str(files["red"])})
    assert search("rating:explicit") == (0, {str(files["blue"])})
    assert search("rating:general -red") == (0, {str(files["green"]), str(files["white"])})
    assert search("red", "-crimson_knight") == (1, set())
    assert search("general:crimson_knight") == (1, set())
    # below the general threshold (0.35) but stored above the floor: not a match
    assert search(">_<") == (1, set())

    res = run_tagd("--config", str(config_file), "search", "red", "--format", "json")
    assert res.returncode == 0
    (hit,) = json.loads(res.stdout)
    assert hit["path"] == str(files["red"])
    assert len(hit["sha256"]) == 64
    assert hit["tags"]["general:red"] > 0.85

    bad = run_tagd("--config", str(config_file), "search", 'red "unclosed')
    assert bad.returncode == 2
    assert "^ unclosed quote" in bad.stderr
    assert "Traceback" not in bad.stderr

    show = run_tagd("--config", str(config_file), "show", str(files["red"]))
    assert show.returncode == 0, show.stderr
    assert "[probe]" in show.stdout
    lines = show.stdout.splitlines()
    rating = next(line for line in lines if line.strip().startswith("rating:"))
    character = next(line for line in lines if line.strip().startswith("character:"))
    general = next(line for line in lines if line.strip().startswith("general:"))
    assert "general 0.50" in rating
    assert "crimson_knight 0.9" in character
    assert "red 0.9" in general and "white_corner 1.00" in general
    assert ">_<" not in general
    everything = run_tagd("--config", str(config_file), "show", str(files["red"]), "--all")
    assert ">_< 0.27*" in everything.stdout


def test_bad_files_fail_alone(tmp_path: Path, gallery: Path, probe_model: Path) -> None:
    ok = save(gallery / "ok.png", (255, 0, 0))
    (gallery / "empty.jpg").write_bytes(b"")
    (gallery / "garbage.png").write_bytes(os.urandom(2000))
    (gallery / "text.jpg").write_text("this is not an image")
    buf = io.BytesIO()
    Image.effect_noise((400, 300), 60).convert("RGB").save(buf, "JPEG", quality=90)
    (gallery / "half.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("L", (3000, 3000), 7).save(gallery / "bomb.png")
    (gallery / "notes.txt").write_text("skipped: unsupported extension")
    (gallery / "song.mp3").write_bytes(b"\x00" * 100)
    (gallery / "movie.mp4").write_bytes(b"\x00" * 100)  # read since #13: not a video
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "max_image_pixels": 4_000_000,
            "inference": {"device": "cpu"},
            # modified within the settle time: maybe still being copied (older ones fail)
            "daemon": {"settle_seconds": 600},
        },
    )
    r = run_tagd("-c", str(cfg), "scan")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    conn = sqlite3.connect(tmp_path / "t.db")
    jobs = {Path(p).name: (s, e) for p, s, e in conn.execute("SELECT path, state, error FROM jobs")}
    assert "notes.txt" not in jobs and "song.mp3" not in jobs
    assert jobs["movie.mp4"][0] == "failed" and "not a readable video" in jobs["movie.mp4"][1]
    assert jobs["ok.png"] == ("done", None)
    assert jobs["garbage.png"][0] == "failed" and "not a recognised image" in jobs["garbage.png"][1]
    assert jobs["text.jpg"][0] == "failed"
    assert jobs["bomb.png"][0] == "failed" and "max_image_pixels" in jobs["bomb.png"][1]
    # possibly still being written: retried later with backoff, reason kept
    assert jobs["empty.jpg"] == ("queued", "empty file (0 bytes)")
    assert jobs["half.jpg"][0] == "queued" and "truncated" in jobs["half.jpg"][1]
    assert run_tagd("-c", str(cfg), "search", "red").stdout.split() == [str(ok)]


def test_rescan_and_rename_do_not_retag(config_file: Path, gallery: Path, tmp_path: Path) -> None:
    files = _gallery(gallery)
    assert run_tagd("-c", str(config_file), "scan").returncode == 0
    db = tmp_path / "state" / "tagd.db"
    conn = sqlite3.connect(db)
    before = conn.execute("SELECT file_id, model_id, tagged_at FROM taggings").fetchall()

    again = run_tagd("-c", str(config_file), "scan")
    assert "found 4 images, 0 new or changed" in again.stderr

    moved = gallery / "renamed" / "crimson.jpg"
    moved.parent.mkdir()
    files["red"].rename(moved)
    r = run_tagd("-c", str(config_file), "scan")
    assert r.returncode == 0, r.stderr
    assert conn.execute("SELECT file_id, model_id, tagged_at FROM taggings").fetchall() == before
    assert run_tagd("-c", str(config_file), "search", "red").stdout.split() == [str(moved)]
    gone = run_tagd("-c", str(config_file), "show", str(files["red"]))
    assert gone.returncode == 1 and "not in the index" in gone.stderr
    assert conn.execute("SELECT count(*) FROM scores").fetchone()[0] > 0
    assert conn.execute("SELECT count(DISTINCT file_id) FROM taggings").fetchone()[0] == 4


def test_unmounted_root_keeps_index(config_file: Path, gallery: Path) -> None:
    files = _gallery(gallery)
    assert run_tagd("-c", str(config_file), "scan").returncode == 0
    hidden = gallery.with_name("unplugged")
    gallery.rename(hidden)
    gallery.mkdir()  # an empty mount point, as after an unmount
    r = run_tagd("-c", str(config_file), "scan")
    assert "missing or empty" in r.stderr
    gallery.rmdir()
    hidden.rename(gallery)
    assert run_tagd("-c", str(config_file), "search", "red").stdout.split() == [str(files["red"])]


def test_new_model_tags_known_files(tmp_path: Path, gallery: Path, probe_model: Path) -> None:
    _gallery(gallery)
    base = {"database": str(tmp_path / "t.db"), "watch": [str(gallery)]}
    one = write_config(
        tmp_path / "one.yaml", {**base, "models": [{"name": "a", "path": str(probe_model)}]}
    )
    two = write_config(
        tmp_path / "two.yaml",
        {
            **base,
            "models": [
                {"name": "a", "path": str(probe_model)},
                {"name": "b", "path": str(probe_model), "thresholds": {"general": 0.2}},
            ],
        },
    )
    assert run_tagd("-c", str(one), "scan").returncode == 0
    r = run_tagd("-c", str(two), "scan")
    assert "4 known images lack results" in r.stderr
    conn = sqlite3.connect(tmp_path / "t.db")
    per_model = dict(
        conn.execute(
            "SELECT m.name, count(*) FROM taggings t JOIN models m ON m.id = t.model_id GROUP BY 1"
        ).fetchall()
    )
    assert per_model == {"a": 4, "b": 4}
    # model b's lower general threshold selects the kaomoji tag; any model counts in search
    assert run_tagd("-c", str(two), "search", ">_<").returncode == 0


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [
        (
            {"models": [{"name": "x", "reop": "a/b"}]},
            "models[0].reop: unknown key; did you mean 'repo'?",
        ),
        ({"models": [{"name": "x", "repo": "nope"}]}, "models[0].repo: expected 'owner/name'"),
        ({"watch": [{"path": "/x", "polling": "yes"}]}, "watch[0].polling: expected true or false"),
        ({"score_floor": 2}, "score_floor: expected a number from 0 to 1"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, cfg: dict, needle: str) -> None:
    path = write_config(tmp_path / "bad.yaml", cfg)
    r = run_tagd("-c", str(path), "scan")
    assert r.returncode == 2
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_local_model_is_one_line(tmp_path: Path, gallery: Path) -> None:
    save(gallery / "a.png", (1, 2, 3))
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "models": [{"name": "mine", "path": str(tmp_path / "nowhere")}],
        },
    )
    r = run_tagd("-c", str(cfg), "scan")
    assert r.returncode == 3
    assert "model 'mine'" in r.stderr and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


def test_config_from_env_and_xdg(tmp_path: Path, config_file: Path, gallery: Path) -> None:
    _gallery(gallery)
    r = run_tagd("scan", env={"TAGD_CONFIG": str(config_file)})
    assert r.returncode == 0, r.stderr
    xdg = tmp_path / "xdg"
    (xdg / "tagd").mkdir(parents=True)
    (xdg / "tagd" / "config.yaml").write_text(config_file.read_text())
    env = {"XDG_CONFIG_HOME": str(xdg), "TAGD_CONFIG": ""}
    assert run_tagd("search", "red", env=env).returncode == 0
