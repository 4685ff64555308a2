"""`tagd search/similar/dupes/tags/stats` as subprocesses over a real index file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tagd, write_config
from test_search_semantics import build_index, reference

from tagd.search.query import parse


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cli")
    idx = build_index(tmp)
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((61, 6)).astype(np.float32)
    vecs[2] = vecs[1] * 3 + 0.01  # same direction as file 1, different length
    vecs[3] = vecs[1] + rng.standard_normal(6).astype(np.float32) * 0.3
    conn = sqlite3.connect(idx.db)
    conn.executemany(
        "INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) "
        "VALUES (?, 1, 6, 'float16', ?)",
        [(fid, vecs[fid].astype("<f2").tobytes()) for fid in range(1, 61)],
    )
    conn.commit()
    conn.close()
    cfg = write_config(
        tmp / "config.yaml",
        {
            "database": str(idx.db),
            "watch": [str(tmp)],
            "models": [{"name": "wd", "path": str(tmp)}],
        },
    )
    return idx, cfg


def tagd(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return run_tagd("--config", str(cfg), *args)


def path_of(idx, fid: int) -> str:
    return min(p for p, f, _ in idx.rows if f == fid)


def test_formats_and_exit_codes(setup) -> None:
    idx, cfg = setup
    expected = reference(idx, parse("1girl -hat"))
    r = tagd(cfg, "search", "1girl", "-hat")  # -hat must not be taken for -h
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.splitlines()) == expected
    r0 = tagd(cfg, "search", "1girl", "-hat", "-0")
    assert r0.returncode == 0
    assert r0.stdout.endswith("\0") and set(r0.stdout[:-1].split("\0")) == expected
    r0b = tagd(cfg, "search", "-0", "1girl", "-hat")
    assert r0b.stdout == r0.stdout
    js = json.loads(tagd(cfg, "search", "1girl -hat", "--format", "json").stdout)
    assert {h["path"] for h in js} == expected
    assert all(set(h["tags"]) == {"general:1girl"} and h["score"] > 0 for h in js)
    lines = tagd(cfg, "search", "1girl -hat", "--format", "jsonl").stdout.splitlines()
    assert [json.loads(x)["path"] for x in lines] == [h["path"] for h in js]
    tsv = tagd(cfg, "search", "1girl -hat", "--format", "tsv").stdout.splitlines()
    assert [row.split("\t")[0] for row in tsv] == [h["path"] for h in js]
    assert all(len(row.split("\t")) == 4 for row in tsv)
    c = tagd(cfg, "search", "1girl -hat", "--count")
    assert (c.returncode, c.stdout.strip()) == (0, str(len(expected)))
    page = tagd(cfg, "search", "1girl -hat", "--limit", "2", "--offset", "1")
    assert page.stdout.splitlines() == [h["path"] for h in js][1:3]
    none = tagd(cfg, "search", "1girl", "general:hatsune_miku")
    assert (none.returncode, none.stdout) == (1, "")
    assert tagd(cfg, "search", "general:hatsune_miku", "--count").returncode == 1


def test_bad_query_caret(setup) -> None:
    _, cfg = setup
    r = tagd(cfg, "search", "1girl (smile | hat")
    assert r.returncode == 2
    err = r.stderr.splitlines()
    assert err[-2] == "1girl (smile | hat" and err[-1].index("^") == 6
    assert "Traceback" not in r.stderr
    r = tagd(cfg, "search", "model:nope 1girl")
    assert r.returncode == 2 and "no model named 'nope'" in r.stderr and "wd" in r.stderr


def test_explain_and_sql_keep_user_text_out_of_sql(setup) -> None:
    _, cfg = setup
    ex = tagd(cfg, "search", "1girl | smile:>0.5 -hat", "--explain")
    assert ex.returncode == 0
    assert "OR" in ex.stdout and "NOT" in ex.stdout and "wd general 0.35" in ex.stdout
    evil = "x');DROP_TABLE_files;--"
    sql = tagd(cfg, "search", evil, "--sql")
    assert sql.returncode == 0, sql.stderr
    statement, params = sql.stdout.splitlines()
    assert "drop_table" not in statement.lower() and evil.lower() in json.loads(params)


def test_similar_and_dupes(setup) -> None:
    idx, cfg = setup
    r = tagd(cfg, "similar", path_of(idx, 1), "--limit", "2", "--format", "tsv")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert [row[0] for row in rows] == [path_of(idx, 2), path_of(idx, 3)]
    assert float(rows[0][1]) > 0.999 > float(rows[1][1])
    by_sha = tagd(cfg, "similar", f"{1:064x}", "--limit", "1")
    assert by_sha.stdout.splitlines() == [path_of(idx, 2)]
    assert list(Path(idx.db).parent.glob("*.sim-1-*.npy"))  # cached next to the DB
    term = tagd(cfg, "search", f"similar:{path_of(idx, 1)}:>=0.999")
    assert term.returncode == 0 and set(term.stdout.splitlines()) == {
        p for p, f, _ in idx.rows if f == 2
    }
    missing = tagd(cfg, "similar", "/nowhere.png")
    assert missing.returncode == 1 and "not in the index" in missing.stderr
    d = json.loads(tagd(cfg, "dupes", "--min-sim", "0.999", "--format", "json").stdout)
    assert [sorted(m["path"] for m in g) for g in d["near"]] == [
        sorted([path_of(idx, 1), path_of(idx, 2)])
    ]
    multi = {f for _, f, _ in idx.rows if sum(1 for _, g, _ in idx.rows if g == f) > 1}
    assert {e["sha256"] for e in d["exact"]} == {f"{f:064x}" for f in multi}
    full = tagd(cfg, "dupes", "--min-sim", "0.999", "--exhaustive", "--format", "json")
    assert full.returncode == 0 and json.loads(full.stdout) == d


def test_tags_and_stats(setup) -> None:
    idx, cfg = setup
    r = tagd(cfg, "tags", "--top", "3")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    counts = [int(line.split("\t")[0]) for line in r.stdout.splitlines()]
    assert counts == sorted(counts, reverse=True)
    ch = tagd(cfg, "tags", "character:hat")
    assert [line.split("\t")[1] for line in ch.stdout.splitlines()] == ["character:hatsune_miku"]
    miku = next(t for t, (ns, n) in idx.tags.items() if n == "hatsune_miku")
    n_files = len({f for (f, _, t), (_, sel) in idx.scores.items() if t == miku and sel})
    assert int(ch.stdout.split("\t")[0]) == n_files > 0
    wd = tagd(cfg, "tags", "--model", "wd", "character:hatsune")
    n_wd = sum(1 for (f, m, t), (_, sel) in idx.scores.items() if t == miku and m == 1 and sel)
    assert wd.stdout == f"{n_wd}\tcharacter:hatsune_miku\n"
    assert tagd(cfg, "tags", "--model", "nope").returncode == 2
    s = json.loads(tagd(cfg, "stats", "--format", "json").stdout)
    assert s["files"] == 60 and s["jobs"]["failed"] == 2
    assert s["models"]["wd"]["embeddings"] == 60 and s["db_bytes"] > 0


def test_search_imports_stay_light(setup) -> None:
    _, cfg = setup
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tagd", "--config", str(cfg), "search", "1girl"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines()}
    assert "tagd" in imported
    assert not imported & {"numpy", "onnxruntime", "PIL"}


def test_similar_index_rebuilds_when_embeddings_change(tmp_path: Path) -> None:
    from tagd.index.db import connect
    from tagd.search.similar import EmbeddingIndex

    db = tmp_path / "e.db"
    conn = connect(db)
    conn.execute(
        "INSERT INTO models(id, name, family, source, updated_at) VALUES (1, 'm', 'wd14', 'x', 0)"
    )
    vec = {1: [1, 0, 0], 2: [0.9, 0.1, 0], 3: [0, 1, 0]}
    for fid, v in vec.items():
        conn.execute(
            "INSERT INTO files(id, sha256, size, first_seen) VALUES (?, ?, 1, 0)", (fid, str(fid))
        )
        conn.execute(
            "INSERT INTO embeddings VALUES (?, 1, 3, 'float16', ?)",
            (fid, np.asarray(v, "<f2").tobytes()),
        )
    first = EmbeddingIndex.open(conn, db, None).nearest_to_file(1, limit=1)
    assert first[0][0] == 2
    assert EmbeddingIndex.open(conn, db, None).nearest_to_file(1, limit=1) == first  # cached
    conn.execute(
        "UPDATE embeddings SET vector = ? WHERE file_id = 3",
        (np.asarray([1, 0, 0.01], "<f2").tobytes(),),
    )
    assert EmbeddingIndex.open(conn, db, None).nearest_to_file(1, limit=1)[0][0] == 3
    conn.execute("DELETE FROM embeddings WHERE file_id = 3")
    assert EmbeddingIndex.open(conn, db, None).nearest_to_file(1, limit=1)[0][0] == 2


def test_similar_index_takes_in_changes_without_a_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tagd.search.similar
    from tagd.index.db import connect
    from tagd.search.similar import EmbeddingIndex

    db = tmp_path / "e.db"
    conn = connect(db)
    conn.execute(
        "INSERT INTO models(id, name, family, source, updated_at) VALUES (1, 'm', 'wd14', 'x', 0)"
    )

    def put(fid: int, v: list[float]) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO files(id, sha256, size, first_seen) VALUES (?, ?, 1, 0)",
            (fid, str(fid)),
        )
        conn.execute(
            "INSERT INTO embeddings VALUES (?, 1, 3, 'float16', ?) ON CONFLICT DO UPDATE "
            "SET vector = excluded.vector",
            (fid, np.asarray(v, "<f2").tobytes()),
        )

    for fid, v in {1: [1, 0, 0], 2: [0.9, 0.1, 0], 3: [0, 1, 0], 4: [0, 0, 1]}.items():
        put(fid, v)

    def cached() -> str:
        """The matrix file the cache's meta names (a rebuild writes another)."""
        return str(json.loads((tmp_path / "e.db.sim-1.json").read_text())["file"])

    EmbeddingIndex.open(conn, db, None)
    written = cached()
    # The daemon goes on: a new file, a re-tagged one, a deleted one.
    put(5, [0.99, 0.02, 0])
    put(3, [0.98, 0, 0.05])
    conn.execute("DELETE FROM embeddings WHERE file_id = 2")
    index = EmbeddingIndex.open(conn, db, None)
    assert cached() == written  # served from the cache plus SQLite
    assert sorted(index.extra_ids.tolist()) == [3, 5] and len(index.hidden) == 2
    got = index.nearest_to_file(1, limit=None)
    assert [f for f, _ in got] == [5, 3, 4]
    assert index.nearest_to_file(5, limit=1)[0][0] == 1  # a new file as the query
    fresh = EmbeddingIndex.open(conn, db, None, changes_ok=False)
    assert cached() != written
    again = fresh.nearest_to_file(1, limit=None)
    assert [f for f, _ in again] == [5, 3, 4]
    assert [s for _, s in again] == pytest.approx([s for _, s in got], abs=1e-6)
    assert [[f for f, _ in g] for g in index.groups(0.95)] == [[1, 3, 5]]
    assert [[f for f, _ in g] for g in fresh.groups(0.95)] == [[1, 3, 5]]
    # Past DELTA_MAX changed files a rebuild is cheaper.
    monkeypatch.setattr(tagd.search.similar, "DELTA_MAX", 1)
    put(4, [0, 0.5, 0.5])
    put(6, [0, 0, 1])
    written = cached()
    assert len(EmbeddingIndex.open(conn, db, None).extra_ids) == 0
    assert cached() != written
