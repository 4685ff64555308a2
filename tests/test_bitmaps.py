"""Posting-list bitmaps: every count through them equals SQLite's and the brute-force reference,
also after patches, restores, stale caches and path changes."""

from __future__ import annotations

import logging
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_search_semantics import (
    QUERIES,
    REVIEW_QUERIES,
    Index,
    add_reviews,
    build_index,
    reference,
)

from tagd.index import changes, sidecache
from tagd.index.db import connect
from tagd.search import bitmaps
from tagd.search.compile import _tag_ids, build_sql
from tagd.search.execute import count
from tagd.search.query import QueryError, parse
from tagd.search.types import SearchOptions

BITMAP_ATOMS = [
    "1girl", "solo", "smile", "hat*", "character:*", "rating:<=sensitive", ">_<", ":d",
    "re:zero", "*", "general:*", "rating:general", "hatsune_miku", "long_hair",
]  # fmt: skip
FALLBACK_ATOMS = ["long_hair:>0.7", "smile:<0.3", "ext:png", "width:>=1920", "tags:<8"]


@st.composite
def raw_queries(draw, atoms: list[str], depth: int = 0) -> str:  # type: ignore[no-untyped-def]
    if depth > 2 or draw(st.booleans()):
        atom = draw(st.sampled_from(atoms))
        return ("-" + atom) if draw(st.integers(0, 3)) == 0 else atom
    parts = draw(st.lists(raw_queries(atoms, depth + 1), min_size=2, max_size=3))
    joined = (" | " if draw(st.booleans()) else " ").join(parts)
    return f"({joined})" if draw(st.booleans()) else joined


def _valid(text: str) -> bool:
    try:
        parse(text)
    except QueryError:
        return False
    return True


def queries(atoms: list[str]) -> st.SearchStrategy[str]:
    """Random trees of the atoms; queries of only exclusions are refused by the parser."""
    return raw_queries(atoms).filter(_valid)


def sql_count(conn: sqlite3.Connection, text: str) -> int:
    q = build_sql(parse(text), SearchOptions(), count=True)
    return int(conn.execute(q.sql, q.params).fetchone()[0])


def fast_count(conn: sqlite3.Connection, db: Path, text: str) -> int | None:
    node = parse(text)

    def count_sql(restrict: str) -> tuple[str, list[object]]:
        q = build_sql(node, SearchOptions(), count=True, restrict=restrict)
        return q.sql, list(q.params)

    return bitmaps.count(conn, str(db), node, tag_sql=_tag_ids, count_sql=count_sql)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Index:
    index = build_index(tmp_path_factory.mktemp("bm"))
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    conn.close()
    return index


@pytest.fixture
def rconn(built: Index):
    c = connect(built.db, readonly=True)
    yield c
    c.close()


@pytest.mark.parametrize("text", QUERIES)
def test_listed_queries_count_like_the_reference(built: Index, rconn, text: str) -> None:
    got = count(rconn, parse(text))
    assert got == len(reference(built, parse(text))) == sql_count(rconn, text)


def test_bitmaps_serve_the_tag_queries(built: Index, rconn) -> None:
    """The counts above came from the bitmaps wherever the query allows it."""
    served = [q for q in QUERIES if fast_count(rconn, built.db, q) is not None]
    assert {"1girl solo -smile", "hat*", "-character:* solo", "rating:<=sensitive"} <= set(served)
    assert "ext:png,webp smile" in served  # a candidate set checked by SQLite
    assert not {"untagged", "model:wd 1girl", "failed | solo"} & set(served)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=queries(BITMAP_ATOMS))
def test_random_boolean_queries_count_like_sqlite(built: Index, rconn, text: str) -> None:
    got = fast_count(rconn, built.db, text)
    assert got is not None
    assert got == sql_count(rconn, text) == len(reference(built, parse(text)))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=queries(BITMAP_ATOMS + FALLBACK_ATOMS))
def test_random_mixed_queries_count_like_sqlite(built: Index, rconn, text: str) -> None:
    assert count(rconn, parse(text)) == sql_count(rconn, text)


def _mutate(conn: sqlite3.Connection, rng: random.Random, n: int) -> None:
    """Retags, untags, path moves, missing paths and new paths, as the daemon and scanner do."""
    fids = [r[0] for r in conn.execute("SELECT id FROM files")]
    tids = [r[0] for r in conn.execute("SELECT id FROM tags")]
    conn.execute("BEGIN")
    for _ in range(n):
        fid = rng.choice(fids)
        action = rng.randrange(5)
        if action == 0:
            conn.execute("DELETE FROM scores WHERE file_id = ? AND model_id = 1", (fid,))
            for tid in rng.sample(tids, 4):
                conn.execute(
                    "INSERT INTO scores(file_id, model_id, tag_id, score, selected) "
                    "VALUES (?, 1, ?, 0.9, 1)",
                    (fid, tid),
                )
            conn.execute(
                "INSERT OR REPLACE INTO taggings(file_id, model_id, floor, tagged_at) "
                "VALUES (?, 1, 0.05, 1)",
                (fid,),
            )
        elif action == 1:
            conn.execute("DELETE FROM scores WHERE file_id = ?", (fid,))
            conn.execute("DELETE FROM taggings WHERE file_id = ?", (fid,))
        elif action == 2:
            conn.execute(
                "UPDATE paths SET missing = 1 - missing WHERE id = "
                "(SELECT id FROM paths WHERE file_id = ? LIMIT 1)",
                (fid,),
            )
        elif action == 3:
            conn.execute(
                "UPDATE paths SET file_id = ? WHERE id = (SELECT id FROM paths ORDER BY random() "
                "LIMIT 1)",
                (fid,),
            )
        else:
            conn.execute(
                "INSERT OR IGNORE INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
                "VALUES (?, ?, 1, 0, 0, 0)",
                (f"/g/new/{rng.random()}.png", fid),
            )
    conn.execute("COMMIT")


CHECK = ["1girl", "1girl solo -smile", "hat* | character:*", "* -rating:general", "*"]


def test_changes_are_exact_before_and_after_the_patch(tmp_path: Path) -> None:
    index = build_index(tmp_path, seed=3)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    rng = random.Random(5)
    for round_ in range(4):
        _mutate(conn, rng, 12)
        for text in CHECK:  # stale: the changed files come from SQLite
            assert fast_count(conn, index.db, text) == sql_count(conn, text), (round_, text)
        outcome = bitmaps.refresh(conn, index.db)
        assert outcome.startswith("patched ")
        for text in CHECK:
            assert fast_count(conn, index.db, text) == sql_count(conn, text), (round_, text)
    patched = bitmaps.Cache.open(index.db)
    assert patched is not None
    assert bitmaps.refresh(conn, index.db) == "fresh"
    assert bitmaps.refresh(conn, index.db, max_age_s=0) == "built"
    rebuilt = bitmaps.Cache.open(index.db)
    assert rebuilt is not None
    for tag in set(patched.tags) | set(rebuilt.tags):
        assert patched.tag(tag) == rebuilt.tag(tag), tag
    assert set(patched.namespaces) == set(rebuilt.namespaces)
    for ns in patched.namespaces:
        assert patched.namespace(ns) == rebuilt.namespace(ns)
    assert [patched.layer(k) for k in range(4)] == [rebuilt.layer(k) for k in range(4)]
    conn.close()
    leftovers = [p for p in tmp_path.iterdir() if ".bitmaps-" in p.name]
    assert len(leftovers) == 1  # replaced data files are removed


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), text=queries(BITMAP_ATOMS))
def test_fuzzed_changes_then_queries(
    tmp_path_factory: pytest.TempPathFactory, seed: int, text: str
) -> None:
    index = build_index(tmp_path_factory.mktemp("fz"), seed=seed % 7)
    conn = connect(index.db)
    bitmaps.refresh(conn, index.db)
    _mutate(conn, random.Random(seed), 10)
    assert fast_count(conn, index.db, text) == sql_count(conn, text)
    bitmaps.refresh(conn, index.db)
    assert fast_count(conn, index.db, text) == sql_count(conn, text)
    conn.close()


def test_path_changes_are_logged(tmp_path: Path) -> None:
    """Migration 0014: presence and file of a path reach the change log; rescans do not."""
    index = build_index(tmp_path)
    conn = connect(index.db)
    seq = changes.current_seq(conn)
    conn.execute("UPDATE paths SET last_seen = 5, mtime_ns = 7, size = 9")
    assert changes.current_seq(conn) == seq
    pid, fid = conn.execute("SELECT id, file_id FROM paths WHERE missing = 0 LIMIT 1").fetchone()
    conn.execute("UPDATE paths SET missing = 1 WHERE id = ?", (pid,))
    assert changes.changed_since(conn, seq, 10) == [fid]
    seq = changes.current_seq(conn)
    conn.execute("UPDATE paths SET file_id = 2 WHERE id = ? AND file_id != 2", (pid,))
    assert sorted(changes.changed_since(conn, seq, 10) or []) == sorted({fid, 2})
    conn.close()


def test_a_restored_or_other_database_never_uses_the_bitmaps(tmp_path: Path) -> None:
    index = build_index(tmp_path)
    backup = tmp_path / "backup.db"
    conn = connect(index.db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copy(index.db, backup)
    _mutate(conn, random.Random(1), 20)
    assert bitmaps.refresh(conn, index.db) == "built"
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    shutil.copy(backup, index.db)
    for suffix in ("-wal", "-shm"):
        Path(f"{index.db}{suffix}").unlink(missing_ok=True)
    conn = connect(index.db)
    assert fast_count(conn, index.db, "1girl") is None  # the cache is newer than the database
    assert count(conn, parse("1girl")) == sql_count(conn, "1girl")
    assert bitmaps.refresh(conn, index.db) == "built"
    assert fast_count(conn, index.db, "1girl") == sql_count(conn, "1girl")
    conn.execute("UPDATE state SET value = 'another' WHERE key = 'db.id'")
    assert fast_count(conn, index.db, "1girl") is None
    conn.close()


def test_too_many_changes_fall_back_then_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build_index(tmp_path)
    conn = connect(index.db)
    bitmaps.refresh(conn, index.db)
    monkeypatch.setattr(bitmaps, "DIRTY_MAX", 3)
    _mutate(conn, random.Random(2), 30)
    assert fast_count(conn, index.db, "solo") is None
    assert count(conn, parse("solo")) == sql_count(conn, "solo")
    assert bitmaps.refresh(conn, index.db) == "built"
    assert fast_count(conn, index.db, "solo") == sql_count(conn, "solo")
    conn.close()


def test_damaged_data_file_is_not_used(tmp_path: Path) -> None:
    index = build_index(tmp_path)
    conn = connect(index.db)
    bitmaps.refresh(conn, index.db)
    meta = sidecache.read_meta(index.db, bitmaps.KIND, bitmaps.FORMAT)
    assert meta is not None
    data = tmp_path / meta["file"]
    data.write_bytes(data.read_bytes()[:-10])
    assert fast_count(conn, index.db, "1girl") is None
    assert bitmaps.refresh(conn, index.db) == "built"
    assert fast_count(conn, index.db, "1girl") == sql_count(conn, "1girl")
    conn.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = build_index(tmp_path)
    conn = connect(index.db)
    tmp_path.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="tagd.index.sidecache"):
            assert bitmaps.refresh(conn, index.db) == "skipped"
            assert bitmaps.refresh(conn, index.db) == "skipped"
    finally:
        tmp_path.chmod(0o755)
    assert len([r for r in caplog.records if "cannot be written" in r.getMessage()]) == 1
    assert count(conn, parse("1girl")) == sql_count(conn, "1girl")
    conn.close()


def test_a_failed_write_leaves_the_old_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    index = build_index(tmp_path)
    conn = connect(index.db)
    bitmaps.refresh(conn, index.db)
    before = sorted(p.name for p in tmp_path.iterdir())
    _mutate(conn, random.Random(4), 5)

    def full(*_a: object, **_k: object) -> str:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sidecache, "write_data", full)
    monkeypatch.setattr(sidecache, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="tagd.index.sidecache"):
        assert bitmaps.refresh(conn, index.db) == "skipped"
    assert "No space left on device" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert fast_count(conn, index.db, "1girl solo") == sql_count(conn, "1girl solo")
    conn.close()


def test_without_path_logging_the_bitmaps_are_not_used(tmp_path: Path) -> None:
    """A database missing migration 0014's triggers could move paths unseen: SQLite counts."""
    index = build_index(tmp_path)
    conn = connect(index.db)
    bitmaps.refresh(conn, index.db)
    assert fast_count(conn, index.db, "1girl") is not None
    conn.execute("DROP TRIGGER paths_log_update")
    assert fast_count(conn, index.db, "1girl") is None
    assert count(conn, parse("1girl")) == sql_count(conn, "1girl")
    conn.close()


@pytest.mark.parametrize("after", [False, True])
def test_counts_with_verdicts_use_the_bitmaps_and_follow_the_verdicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    """Verdicts given before the bitmaps were built (`after`: since) are counted again by
    SQLite, file by file; every other file is counted from the bitmaps."""
    index = build_index(tmp_path)
    if not after:
        add_reviews(index)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    if after:
        add_reviews(index)
    served: list[str] = []
    real = bitmaps.count

    def spy(*args: object, **kw: object) -> int | None:
        got = real(*args, **kw)  # type: ignore[arg-type]
        if got is not None:
            served.append(str(kw.get("recheck")))
        return got

    monkeypatch.setattr(bitmaps, "count", spy)
    for text in REVIEW_QUERIES:
        node = parse(text)
        assert count(conn, node) == len(reference(index, node)), text
    assert len(served) >= 15  # the tag queries came from the bitmaps, verdicts and all
    conn.close()
