"""The HNSW index for `similar`: planted neighbours found as the exact scan finds them, changed
files scored exactly before and after a patch, never used for another or restored database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import run_tagd, write_config

from tagd.index import changes
from tagd.index.db import connect
from tagd.search import ann, similar
from tagd.search.similar import EmbeddingIndex

N, DIM, QUERIES, PLANTED = 3000, 48, 8, 20


def _vectors(seed: int = 0) -> np.ndarray:
    """Random unit vectors; files 1..QUERIES each get PLANTED neighbours at cosine 0.75-0.99."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((N + 1, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for q in range(1, QUERIES + 1):
        for j, cos in enumerate(np.linspace(0.99, 0.75, PLANTED)):
            fid = QUERIES + 1 + (q - 1) * PLANTED + j
            noise = rng.standard_normal(DIM).astype(np.float32)
            noise -= noise @ vecs[q] * vecs[q]
            noise /= np.linalg.norm(noise)
            vecs[fid] = cos * vecs[q] + np.sqrt(1 - cos**2) * noise
    return vecs


def _index(tmp: Path, vecs: np.ndarray) -> Path:
    db = tmp / "t.db"
    conn = connect(db)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO models(id, name, family, source, settings, updated_at) "
        "VALUES (1, 'wd', 'wd14', 'x', '{}', 0)"
    )
    for fid in range(1, N + 1):
        conn.execute(
            "INSERT INTO files(id, sha256, size, width, height, format, first_seen) "
            "VALUES (?, ?, 1, 1, 1, 'PNG', 0)",
            (fid, f"{fid:064x}"),
        )
        conn.execute(
            "INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
            "VALUES (?, ?, 1, 0, 0, 0)",
            (f"/g/{fid}.png", fid),
        )
        conn.execute(
            "INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) "
            "VALUES (?, 1, ?, 'float16', ?)",
            (fid, DIM, vecs[fid].astype("<f2").tobytes()),
        )
    conn.execute("COMMIT")
    conn.close()
    return db


def _both(conn: sqlite3.Connection, db: Path, fid: int, limit: int = 20):
    exact = EmbeddingIndex.open(conn, db, None).nearest_to_file(fid, limit=limit, exact=True)
    index = EmbeddingIndex.open(conn, db, None).with_ann(conn, db)
    return exact, index.nearest_to_file(fid, limit=limit), index.ann


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = _index(tmp_path_factory.mktemp("ann"), _vectors())
    conn = connect(db)
    assert similar.refresh_ann(conn, db, min_files=1) == ["wd: built"]
    conn.close()
    return db


def _agree(exact: list[tuple[int, float]], fast: list[tuple[int, float]]) -> int:
    """How many of the exact top-k the index found; its similarities must be the exact ones,
    best first (a graph index may miss a neighbour, it must not misreport one)."""
    truth = dict(exact)
    sims = [s for _, s in fast]
    assert sims == sorted(sims, reverse=True)
    cutoff = min(truth.values())
    for fid, sim in fast:
        if fid in truth:
            assert sim == truth[fid]
        else:
            assert sim <= cutoff + 1e-6  # only a miss lets a farther file in
    return len(truth.keys() & {f for f, _ in fast})


def test_planted_neighbours_are_found_like_the_exact_scan(built: Path) -> None:
    """HNSW built on several threads is not deterministic: at most one planted miss in 160."""
    conn = connect(built, readonly=True)
    found = 0
    for q in range(1, QUERIES + 1):
        exact, fast, used = _both(conn, built, q)
        assert used is not None
        planted = {QUERIES + 1 + (q - 1) * PLANTED + j for j in range(PLANTED)}
        assert {f for f, _ in exact} == planted
        found += _agree(exact, fast)
    assert found >= QUERIES * PLANTED - 1
    conn.close()


def test_recall_on_random_queries_is_high(built: Path) -> None:
    """Unplanted files have no real neighbours (the hardest case for a graph): measured."""
    conn = connect(built, readonly=True)
    hits = total = 0
    for fid in range(500, 3000, 125):
        exact, fast, _ = _both(conn, built, fid)
        hits += len({f for f, _ in exact} & {f for f, _ in fast})
        total += len(exact)
    assert hits / total >= 0.9
    conn.close()


def test_changed_files_are_exact_before_and_after_the_patch(tmp_path: Path) -> None:
    vecs = _vectors(seed=1)
    db = _index(tmp_path, vecs)
    conn = connect(db)
    similar.refresh_ann(conn, db, min_files=1)
    twin = vecs[1] * 0.999 + vecs[2000] * 0.02
    conn.execute(
        "UPDATE embeddings SET vector = ? WHERE file_id = 2500",
        ((twin / np.linalg.norm(twin)).astype("<f2").tobytes(),),
    )
    gone = QUERIES + 1  # file 1's nearest planted neighbour
    conn.execute("DELETE FROM embeddings WHERE file_id = ?", (gone,))
    conn.commit()
    exact, fast, used = _both(conn, db, 1)
    assert used is not None and {2500, gone} <= used.dirty
    assert fast[0] == exact[0] and fast[0][0] == 2500 and gone not in {f for f, _ in fast}
    assert _agree(exact, fast) >= PLANTED - 1
    assert similar.refresh_ann(conn, db, min_files=1) == ["wd: patched 2"]
    exact, fast, used = _both(conn, db, 1)
    assert used is not None and not used.dirty
    assert fast[0] == exact[0] and gone not in {f for f, _ in fast}
    assert _agree(exact, fast) >= PLANTED - 1
    assert similar.refresh_ann(conn, db, min_files=1) == ["wd: fresh"]
    conn.close()
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".usearch"]) == 1


def test_another_or_restored_database_never_uses_the_index(tmp_path: Path) -> None:
    db = _index(tmp_path, _vectors(seed=2))
    conn = connect(db)
    similar.refresh_ann(conn, db, min_files=1)
    conn.execute("UPDATE state SET value = 'another' WHERE key = 'db.id'")
    conn.commit()
    assert ann.Ann.open(conn, db, 1) is None
    conn.execute("UPDATE state SET value = 'x' WHERE key = 'db.id'")
    conn.commit()
    similar.refresh_ann(conn, db, min_files=1)
    meta_seq = changes.current_seq(conn)
    conn.execute("DELETE FROM score_changes WHERE seq >= ?", (meta_seq - 5,))  # a restore
    conn.execute("DELETE FROM sqlite_sequence WHERE name = 'score_changes'")
    conn.commit()
    assert changes.current_seq(conn) < meta_seq
    assert ann.Ann.open(conn, db, 1) is None
    exact, fast, used = _both(conn, db, 3)
    assert used is None and fast == exact  # the exact scan itself
    conn.close()


def test_small_galleries_get_no_index(tmp_path: Path) -> None:
    db = _index(tmp_path, _vectors(seed=3))
    conn = connect(db)
    assert similar.refresh_ann(conn, db) == []  # 3,000 embeddings < MIN_FILES: the scan is as fast
    assert ann.Ann.open(conn, db, 1) is None
    conn.close()


@pytest.mark.slow
def test_similar_cli_exact_and_indexed_agree(built: Path, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "config.yaml",
        {"database": str(built), "watch": [str(tmp_path)], "models": [{"name": "wd", "path": "."}]},
    )
    fast = run_tagd(
        "--config", str(cfg), "similar", "/g/2.png", "--format", "tsv", env={"TAGD_ANN": "on"}
    )
    exact = run_tagd("--config", str(cfg), "similar", "/g/2.png", "--format", "tsv", "--exact")
    assert fast.returncode == exact.returncode == 0, fast.stderr + exact.stderr
    lines, want = fast.stdout.splitlines(), exact.stdout.splitlines()
    assert len(lines) == len(want) == 20 and lines[0] == want[0]
    assert len(set(lines) & set(want)) >= 19
