"""Re-tagging and lossless reindexing through the real CLI on a real SQLite index.

The probe model's `>_<` column scores sigmoid(-1) = 0.27 on every image and `bright` scores
near 0 on dark images: below or above the stored floor (0.3 here) as the test needs.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import yaml
from conftest import run_tagd, save, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from tagd.tagging import results
from tagd.tagging.thresholds import select


def _config(tmp_path: Path, gallery: Path, folder: Path, **extra: object) -> Path:
    entry = {"name": "probe", "path": str(folder), "score_floor": 0.3}
    entry.update(extra.pop("model", {}))  # type: ignore[arg-type]
    return write_config(
        tmp_path / "config.yaml",
        {
            "database": str(tmp_path / "tagd.db"),
            "watch": [str(gallery)],
            "models": [entry],
            "inference": {"device": "cpu"},
            **extra,
        },
    )


def _selected(db: Path, path: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {
            r[0]
            for r in conn.execute(
                """SELECT t.name FROM scores s JOIN tags t ON t.id = s.tag_id
                   JOIN paths p ON p.file_id = s.file_id WHERE p.path = ? AND s.selected = 1""",
                (str(path),),
            )
        }


def test_embeddings_reindex_blacklist_aliases_retag(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    red = save(gallery / "red.png", (255, 0, 0), (300, 100))
    blue = save(gallery / "blue.png", (0, 0, 255), (120, 120))
    conf = _config(tmp_path, gallery, probe_model)
    db = tmp_path / "tagd.db"
    r = run_tagd("--config", str(conf), "scan")
    assert r.returncode == 0, r.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT dim, dtype, length(vector) FROM embeddings").fetchall()
        assert rows == [(6, "float16", 12)] * 2
        assert conn.execute("SELECT dim, n_tags FROM model_heads").fetchall() == [(6, 12)]
        assert {r[0] for r in conn.execute("SELECT floor FROM taggings")} == {0.3}
    assert ">_<" not in _selected(db, red)
    assert {"red", "white_corner"} <= _selected(db, red)

    # below the stored floor: recomputed from embeddings x head, floor lowered, nothing decoded
    red.unlink()
    conf = _config(
        tmp_path,
        gallery,
        probe_model,
        model={"thresholds": {"general": 0.2}},
        tags={"blacklist": ["red"], "aliases": {"white_corner": "pale_corner"}},
    )
    r = run_tagd("--config", str(conf), "reindex", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "2 from embeddings" in r.stderr
    with sqlite3.connect(db) as conn:
        assert {r[0] for r in conn.execute("SELECT floor FROM taggings")} == {0.2}
        (score,) = conn.execute(
            "SELECT s.score FROM scores s JOIN tags t ON t.id = s.tag_id WHERE t.name = '>_<' "
            "AND s.file_id = (SELECT file_id FROM paths WHERE path = ?)",
            (str(red),),
        ).fetchone()
    assert abs(score - 1 / (1 + np.exp(1))) < 1e-3
    sel = _selected(db, red)
    assert ">_<" in sel and "red" not in sel and "white_corner" not in sel and "pale_corner" in sel
    found = run_tagd("--config", str(conf), "search", "pale_corner")
    assert found.stdout.split() == [str(red)]

    # raised above the floor: from stored scores; rules removed: alias rows disappear
    conf = _config(tmp_path, gallery, probe_model, model={"thresholds": {"general": 0.9}})
    r = run_tagd("--config", str(conf), "reindex", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "2 from stored scores" in r.stderr
    assert _selected(db, red) == {"red", "white_corner", "general", "crimson_knight"}
    assert run_tagd("--config", str(conf), "search", "pale_corner").returncode == 1

    # without embeddings a lower threshold cannot be honoured: said, exit 1
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM embeddings")
    conf = _config(tmp_path, gallery, probe_model, model={"thresholds": {"general": 0.1}})
    r = run_tagd("--config", str(conf), "reindex", "--no-progress")
    assert r.returncode == 1
    assert "2 files have no embedding" in r.stderr and "tagd retag --model probe --all" in r.stderr

    # retag: nothing untagged; --all with a query queues only the matching present file
    r = run_tagd("--config", str(conf), "retag", "--model", "probe")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "nothing to queue: no file lacks results from probe\n"
    r = run_tagd("--config", str(conf), "retag", "--model", "probe", "--all", "blue")
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout == "queued 1 of 1 matching file for probe; `tagd run` or `tagd scan` tags them\n"
    )
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT path, force_models FROM jobs WHERE state = 'queued'"
        ).fetchall() == [(str(blue), "probe")]
    r = run_tagd("--config", str(conf), "retag", "--model", "nope")
    assert r.returncode == 2 and "no model named 'nope'" in r.stderr

    models = run_tagd("--config", str(conf), "models", "--format", "json")
    assert models.returncode == 0, models.stderr
    (entry,) = yaml.safe_load(models.stdout)
    assert (entry["name"], entry["tags"], entry["files_tagged"]) == ("probe", 12, 2)
    assert entry["downloaded"] is True


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0, 1, width=32), min_size=6, max_size=6),
    st.sampled_from([0.2, 0.5, "top", "mcut"]),
    st.sampled_from([0.35, "mcut"]),
)
def test_select_many_equals_select(scores: list[float], rating: object, general: object) -> None:
    ns = ["rating", "rating", "general", "general", "character", "general"]
    rules = {"rating": rating, "general": general, "character": "mcut"}
    arr = np.asarray(scores, dtype=np.float32)
    many = results.select_many(arr[None], results.groups(ns), rules)[0]
    np.testing.assert_array_equal(many, select(arr, ns, rules))
