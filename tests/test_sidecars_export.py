"""Sidecar formats, atomic never-clobber writes, csv/jsonl export and the file_tags view."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

from conftest import run_tagd, write_config
from indexdb import make_index, sha_of

from tagd.outputs.sidecars import KohyaOptions, hydrus_text, kohya_text, sidecar_path

TAGS = {
    ("general", "long_hair"): 0.8,
    ("general", "^_^"): 0.9,
    ("general", "smile_(happy)"): 0.5,
    ("character", "hatsune_miku"): 0.95,
    ("rating", "general"): 0.9,
    ("artist", "artist_x"): 0.7,
}


def test_formats() -> None:
    assert hydrus_text(TAGS).splitlines() == [
        "rating:general",
        "character:hatsune miku",
        "creator:artist x",
        "^_^",
        "long hair",
        "smile (happy)",
    ]
    assert kohya_text(TAGS) == "hatsune miku, artist x, ^_^, long hair, smile \\(happy\\)\n"
    opts = KohyaOptions(spaces=False, escape=False, rating=True, exclude=["long hair"])
    assert kohya_text(TAGS, opts) == "general, hatsune_miku, artist_x, ^_^, smile_(happy)\n"
    assert sidecar_path("/g/a.jpg", "hydrus") == Path("/g/a.jpg.txt")
    assert sidecar_path("/g/a.jpg", "kohya") == Path("/g/a.txt")
    assert sidecar_path("/g/a.jpg", "json") == Path("/g/a.jpg.json")


def _setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    g = tmp_path / "g"
    g.mkdir()
    a, b = str(g / "a.png"), str(g / "b.png")
    make_index(
        tmp_path / "t.db",
        {
            a: {"general": 0.9, "long_hair": 0.8, "hatsune_miku": 0.95},
            b: {"sensitive": 0.8, "smile": 0.6},
            str(g / "gone.png"): {"general": 0.9, "solo": 0.9},
        },
        missing=(str(g / "gone.png"),),
    ).close()
    conf = write_config(tmp_path / "c.yaml", {"database": str(tmp_path / "t.db")})
    return conf, Path(a), Path(b)


def test_sidecars_cli_never_clobbers_user_files(tmp_path: Path) -> None:
    conf, a, b = _setup(tmp_path)
    user = Path(str(b) + ".txt")
    user.write_text("my own tag\n")
    r = run_tagd("-c", str(conf), "export", "sidecars", "--style", "hydrus")
    assert r.returncode == 0, r.stderr
    assert "1 written, 0 unchanged, 1 kept" in r.stderr
    assert (
        Path(str(a) + ".txt").read_text() == "rating:general\ncharacter:hatsune miku\nlong hair\n"
    )
    assert user.read_text() == "my own tag\n"
    assert not (a.parent / "gone.png.txt").exists()
    assert [p.name for p in a.parent.iterdir() if "tagd-tmp" in p.name] == []

    # tagd's own sidecar is updated after a retag; the user's is still kept
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute(
        "UPDATE scores SET selected = 0 WHERE tag_id = "
        "(SELECT id FROM tags WHERE name = 'long_hair')"
    )
    conn.commit()
    conn.close()
    r = run_tagd("-c", str(conf), "export", "sidecars", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["written"], summary["kept"]) == (1, 1)
    assert summary["kept_paths"] == [str(user)]
    assert "long hair" not in Path(str(a) + ".txt").read_text()
    # a user edit to tagd's sidecar makes it the user's
    Path(str(a) + ".txt").write_text("edited\n")
    run_tagd("-c", str(conf), "export", "sidecars")
    assert Path(str(a) + ".txt").read_text() == "edited\n"
    r = run_tagd("-c", str(conf), "export", "sidecars", "--overwrite")
    assert "2 written" in r.stderr
    assert user.read_text() == "rating:sensitive\nsmile\n"

    r = run_tagd("-c", str(conf), "export", "sidecars", "hatsune_miku", "--style", "kohya")
    assert r.returncode == 0, r.stderr
    assert (a.parent / "a.txt").read_text() == "hatsune miku\n"  # long_hair deselected above
    assert not (a.parent / "b.txt").exists()


def test_export_csv_jsonl_and_view(tmp_path: Path) -> None:
    conf, a, b = _setup(tmp_path)
    r = run_tagd("-c", str(conf), "export", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {(x["path"], x["namespace"], x["tag"]) for x in rows} == {
        (str(a), "rating", "general"),
        (str(a), "general", "long_hair"),
        (str(a), "character", "hatsune_miku"),
        (str(b), "rating", "sensitive"),
        (str(b), "general", "smile"),
    }
    assert all(x["sha256"] == sha_of(x["path"]) and x["model"] == "m1" for x in rows)
    view = (
        sqlite3.connect(tmp_path / "t.db")
        .execute("SELECT path, sha256, model, namespace, tag, score FROM file_tags")
        .fetchall()
    )
    assert {(p, ns, t) for p, _, _, ns, t, _ in view} == {
        (x["path"], x["namespace"], x["tag"]) for x in rows
    }

    r = run_tagd("-c", str(conf), "export", "--format", "jsonl", "rating:sensitive")
    (rec,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["paths"] == [str(b)]
    assert {t["tag"] for t in rec["tags"]} == {"sensitive", "smile"}
    bad = run_tagd("-c", str(conf), "export", "--model", "nope")
    assert bad.returncode == 2 and "no results stored for model 'nope'" in bad.stderr
