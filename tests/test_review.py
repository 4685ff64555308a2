"""Human review (migration 0011): verdicts override effective tags everywhere they are read,
and survive reindex and retag."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config
from indexdb import make_index, sha_of

from tagd.hydrus.sync import HydrusConfig, desired_tags
from tagd.index import reviews as review
from tagd.outputs.effective import iter_files
from tagd.search.execute import count, search
from tagd.search.query import parse


def _index(tmp_path: Path) -> tuple[Path, str, str]:
    g = tmp_path / "g"
    g.mkdir()
    a, b = str(g / "a.png"), str(g / "b.png")
    for p in (a, b):
        Path(p).write_bytes(b"x")
    make_index(
        tmp_path / "t.db",
        {a: {"general": 0.9, "long_hair": 0.8, "solo": 0.7}, b: {"sensitive": 0.8, "smile": 0.6}},
    ).close()
    conf = write_config(tmp_path / "c.yaml", {"database": str(tmp_path / "t.db")})
    return conf, a, b


def _paths(conn: sqlite3.Connection, q: str) -> list[str]:
    return sorted(h.path for h in search(conn, parse(q)))


def test_review_cli_search_sidecar_export_follow(tmp_path: Path) -> None:
    conf, a, b = _index(tmp_path)
    r = run_tagd("--config", str(conf), "review", a, "+smile", "-long_hair", "+<b>odd</b>")
    assert r.returncode == 0, r.stderr
    assert "+general:smile" in r.stdout and "-general:long_hair" in r.stdout
    conn = sqlite3.connect(tmp_path / "t.db")
    assert _paths(conn, "smile") == [a, b]
    assert _paths(conn, "long_hair") == []
    assert _paths(conn, "smile -long_hair solo") == [a]
    assert _paths(conn, "reviewed") == [a]
    assert _paths(conn, "source:human") == [a]
    assert _paths(conn, "path:* -reviewed") == [b]
    assert count(conn, parse("smile")) == 2
    # ranked page: the human tag ranks like a certain score, first
    hits = search(conn, parse("smile"), limit=1)
    assert [h.path for h in hits] == [a]
    # the CLI follows
    r = run_tagd("--config", str(conf), "search", "smile")
    assert r.stdout.split() == [a, b]
    # sidecars and export follow
    r = run_tagd("--config", str(conf), "export", "sidecars", "--style", "hydrus")
    assert r.returncode == 0, r.stderr
    lines = Path(a + ".txt").read_text().splitlines()
    assert "smile" in lines and "long hair" not in lines and "solo" in lines
    r = run_tagd("--config", str(conf), "export", "--format", "jsonl")
    rows = {json.loads(x)["paths"][0]: json.loads(x) for x in r.stdout.splitlines()}
    text = json.dumps(rows[a])
    assert "smile" in text and "long_hair" not in text and "human" in text
    # Hydrus sync sends the effective tags
    fs = next(f for f in iter_files(conn) if a in f.paths)
    tags = desired_tags(fs, HydrusConfig())
    assert "smile" in tags and "long hair" not in tags
    # clearing hands the tag back to the models
    r = run_tagd("--config", str(conf), "review", a, "--clear", "long_hair", "--clear", "smile")
    assert r.returncode == 0, r.stderr
    assert _paths(conn, "long_hair") == [a]
    assert _paths(conn, "smile") == [b]
    conn.close()


def test_review_errors_are_one_line(tmp_path: Path) -> None:
    conf, a, _ = _index(tmp_path)
    r = run_tagd("--config", str(conf), "review", str(tmp_path / "nope.png"), "+x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not in the index" in r.stderr
    r = run_tagd("--config", str(conf), "review", a, "smile")
    assert r.returncode == 2 and "+TAG" in r.stderr and "Traceback" not in r.stderr
    r = run_tagd("--config", str(conf), "review", sha_of(a)[:12], "+ok", "--format", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["reviews"][0]["tag"] == "ok"


def test_eval_scores_models_against_reviews(tmp_path: Path) -> None:
    conf, a, _ = _index(tmp_path)
    assert run_tagd("--config", str(conf), "review", a, "-solo", "+smile").returncode == 0
    r = run_tagd("--config", str(conf), "eval", "-m", "m1", "--truth", "reviews", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)[0]
    assert report["files"] == 1  # only the reviewed file is ground truth
    general = report["categories"]["general"]["at_thresholds"]
    assert (general["tp"], general["fp"], general["fn"]) == (1, 1, 1)  # solo wrong, smile missed
    assert 0 < report["mean_file_score"] < 1


def test_unmigrated_read_only_database_still_searches(tmp_path: Path) -> None:
    """A read-only open of a database without the reviews table: no review terms."""
    _, a, _ = _index(tmp_path)
    conn = sqlite3.connect(tmp_path / "t.db")
    conn.execute("DROP TABLE reviews")
    conn.commit()
    assert not review.in_use(conn)
    assert _paths(conn, "long_hair") == [a]
    assert _paths(conn, "reviewed") == []
    conn.close()


@pytest.mark.slow
def test_reindex_and_retag_never_undo_reviews(tmp_path: Path, probe_model: Path) -> None:
    g = tmp_path / "g"
    red = save(g / "red.png", (250, 10, 10))
    cfg = {
        "database": str(tmp_path / "s" / "tagd.db"),
        "watch": [{"path": str(g)}],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu"},
    }
    conf = str(write_config(tmp_path / "c.yaml", cfg))
    assert run_tagd("--config", conf, "scan").returncode == 0
    assert run_tagd("--config", conf, "search", "red").stdout.split() == [str(red)]
    r = run_tagd("--config", conf, "review", str(red), "-red", "+hand_added")
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(cfg["database"])
    tagged_at = conn.execute("SELECT tagged_at FROM taggings").fetchone()[0]
    for step in (("reindex",), ("retag", "--model", "probe", "--all"), ("scan",)):
        r = run_tagd("--config", conf, *step)
        assert r.returncode in (0, 1), (step, r.stderr)
        assert _paths(conn, "red") == [], step
        assert _paths(conn, "hand_added") == [str(red)], step
    assert conn.execute("SELECT tagged_at FROM taggings").fetchone()[0] > tagged_at  # re-run
    # model rows are kept as the model wrote them
    row = conn.execute(
        "SELECT s.selected FROM scores s JOIN tags t ON t.id = s.tag_id WHERE t.name = 'red'"
    ).fetchone()
    assert row == (1,)
    conn.close()
