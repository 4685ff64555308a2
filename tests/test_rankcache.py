"""The ranking cache next to the database: exact pages, dirty files, patches and rebuilds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tagd.search.plan
import tagd.search.rankcache
from tagd.config import TagRules
from tagd.index import changes
from tagd.index.atomic import write_atomic
from tagd.index.db import connect
from tagd.search import rankcache
from tagd.search.execute import iter_search
from tagd.search.query import parse
from tagd.search.types import SearchOptions
from tagd.tagging.reindex import reindex_model
from tests.indexdb import RULES, make_index
from tests.test_search_semantics import ATOMS, Index, build_index

RANKED = [
    "1girl solo",
    "1girl solo long_hair",
    "smile hat -solo",
    "(1girl | hat) smile",
    "model:wd 1girl smile",
    "model:dd solo long_hair width:>700",
    "1girl:>0.5 solo smile",
    "general:1girl solo rating:general",
    "1girl solo ext:png",
    "solo long_hair -(hat | smile:>0.8)",
]


@pytest.fixture
def index(tmp_path: Path) -> Index:
    return build_index(tmp_path)


@pytest.fixture
def used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts searches served through the cache (so a silent fallback cannot pass)."""
    calls: list[int] = []
    real = rankcache.candidates

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tagd.search.rankcache, "candidates", spy)
    return calls


def pages_match_full_ranking(conn, texts: list[str]) -> None:  # type: ignore[no-untyped-def]
    for text in texts:
        node = parse(text)
        full = [(h.path, h.rank) for h in iter_search(conn, node, SearchOptions())]
        for limit, offset in ((1, 0), (5, 2), (40, 0)):
            page = [
                (h.path, h.rank)
                for h in iter_search(conn, node, SearchOptions(limit=limit, offset=offset))
            ]
            assert page == full[offset : offset + limit], (text, limit, offset)


def retag(conn, fid: int, mid: int, scores: dict[int, tuple[float, int]]) -> None:  # type: ignore[no-untyped-def]
    """Replace one (file, model) result the way tagd.store does."""
    conn.execute("DELETE FROM scores WHERE file_id = ? AND model_id = ?", (fid, mid))
    conn.executemany(
        "INSERT INTO scores(file_id, model_id, tag_id, score, selected) VALUES (?, ?, ?, ?, ?)",
        [(fid, mid, t, s, sel) for t, (s, sel) in scores.items()],
    )
    conn.execute(
        "INSERT INTO taggings(file_id, model_id, floor, tagged_at) VALUES (?, ?, 0.05, 1) "
        "ON CONFLICT(file_id, model_id) DO UPDATE SET tagged_at = 1",
        (fid, mid),
    )


def tag_ids(conn, *names: str) -> list[int]:  # type: ignore[no-untyped-def]
    return [conn.execute("SELECT id FROM tags WHERE name = ?", (n,)).fetchone()[0] for n in names]


@given(st.floats(0.0, 1.0))
def test_quantized_bound_is_never_below_the_score(score: float) -> None:
    q = int(rankcache.quantize_up(np.array([score]))[0])
    assert q / rankcache.SCALE >= score
    assert (q == 0) == (score == 0.0)
    assert q / rankcache.SCALE - score <= 1 / rankcache.SCALE


def test_pages_from_the_cache_equal_the_full_ranking(index: Index, used: list[int]) -> None:
    conn = connect(index.db)
    assert rankcache.refresh(conn, index.db, min_files=1) == "built"
    meta = json.loads(rankcache.meta_path(index.db).read_text())
    assert len(meta["tags"]) == len(index.tags)
    pages_match_full_ranking(conn, RANKED)
    assert len(used) == 3 * len(RANKED)
    conn.close()


def test_small_first_batches_still_exact(
    index: Index, used: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tagd.search.plan, "TOPK_FIRST_BATCH", 1)
    conn = connect(index.db)
    rankcache.build(conn, index.db, min_files=1)
    pages_match_full_ranking(conn, RANKED[:4])
    assert used
    conn.close()


def test_files_changed_after_the_build_are_ranked_from_sqlite(
    index: Index, used: list[int]
) -> None:
    conn = connect(index.db)
    rankcache.build(conn, index.db, min_files=1)
    girl, solo, hair = tag_ids(conn, "1girl", "solo", "long_hair")
    # A file that had none of the tags now has all of them at the top; another loses them.
    retag(conn, 3, 1, {girl: (0.999, 1), solo: (0.998, 1), hair: (0.997, 1)})
    retag(conn, 4, 1, {})
    retag(conn, 4, 2, {})
    # A new file, past every id the cache knows.
    conn.execute(
        "INSERT INTO files(id, sha256, size, width, height, format, first_seen) "
        "VALUES (9000, ?, 1, 800, 600, 'PNG', 0)",
        ("f" * 64,),
    )
    conn.execute(
        "INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
        "VALUES ('/g/a/new.png', 9000, 1, 0, 0, 0)"
    )
    retag(conn, 9000, 2, {girl: (0.9995, 1), solo: (0.9995, 1)})
    # Thresholds re-applied in place (as reindex does): logged by the writer itself.
    conn.execute(
        "UPDATE scores SET selected = 0 WHERE file_id = 5 AND tag_id IN (?, ?)", (girl, solo)
    )
    conn.execute("INSERT OR REPLACE INTO score_changes(file_id) VALUES (5)")

    cache = rankcache.RankCache.open(index.db)
    assert cache is not None
    assert sorted(changes.changed_since(conn, cache.seq, 100) or []) == [3, 4, 5, 9000]
    pages_match_full_ranking(conn, RANKED)
    top = next(iter_search(conn, parse("1girl solo"), SearchOptions(limit=1)))
    assert top.path == "/g/a/new.png"
    assert used

    # File 9000 is past the capacity: only a rebuild can take it in.
    assert rankcache.refresh(conn, index.db, min_files=1) == "built"
    conn.execute("UPDATE taggings SET tagged_at = 2 WHERE file_id = 7")
    assert rankcache.refresh(conn, index.db, min_files=1) == "patched 1"
    assert rankcache.refresh(conn, index.db, min_files=1) == "fresh"
    cache = rankcache.RankCache.open(index.db)
    assert cache is not None and changes.changed_since(conn, cache.seq, 100) == []
    col = cache.column(girl)
    assert col is not None and col[3] == rankcache.quantize_up(np.array([0.999]))[0]
    assert col[4] == 0
    pages_match_full_ranking(conn, RANKED)
    conn.close()


def test_patch_rewrites_columns_in_place(index: Index) -> None:
    conn = connect(index.db)
    rankcache.build(conn, index.db, min_files=1)
    girl, solo = tag_ids(conn, "1girl", "solo")
    retag(conn, 9, 1, {girl: (0.42, 1), solo: (0.2, 0)})
    retag(conn, 9, 2, {girl: (0.61, 1)})
    assert rankcache.refresh(conn, index.db, min_files=1) == "patched 1"
    cache = rankcache.RankCache.open(index.db)
    assert cache is not None
    assert cache.columns[cache.rows[girl], 9] == rankcache.quantize_up(np.array([0.61]))[0]
    assert cache.columns[cache.rows[solo], 9] == 0  # stored but not selected
    conn.close()


def test_a_restored_or_other_database_never_uses_the_cache(
    index: Index, tmp_path: Path, used: list[int]
) -> None:
    conn = connect(index.db)
    backup = tmp_path / "backup.db"
    shutil.copy(index.db, backup)
    girl, solo = tag_ids(conn, "1girl", "solo")
    for fid in range(1, 20):
        retag(conn, fid, 1, {girl: (0.99, 1), solo: (0.99, 1)})
    rankcache.build(conn, index.db, min_files=1)
    conn.close()
    # The database goes back to the backup; the cache beside it is newer than it.
    shutil.copy(backup, index.db)
    conn = connect(index.db)
    cache = rankcache.RankCache.open(index.db)
    assert cache is not None and not cache.usable(conn)
    pages_match_full_ranking(conn, RANKED[:2])
    assert not used
    conn.execute("UPDATE state SET value = 'another' WHERE key = 'db.id'")
    assert rankcache.refresh(conn, index.db, min_files=1) == "built"
    pages_match_full_ranking(conn, RANKED[:2])
    assert used
    conn.close()


def test_uncommon_tags_give_the_candidates_from_sqlite(index: Index, used: list[int]) -> None:
    conn = connect(index.db)
    counts = dict(
        conn.execute("SELECT tag_id, count(*) FROM scores WHERE selected = 1 GROUP BY tag_id")
    )
    cut = sorted(counts.values())[len(counts) // 2]
    cache = rankcache.build(conn, index.db, min_files=cut)
    assert set(cache.rows) == {t for t, n in counts.items() if n >= cut}
    names = {t: n for t, (_, n) in index.tags.items() if t in counts}
    rare = [n for t, n in sorted(names.items()) if t not in cache.rows]
    common = [n for t, n in sorted(names.items()) if t in cache.rows]
    assert len(rare) >= 2 and len(common) >= 2
    # Changed after the build: one file gains a rare tag, one loses a common one.
    rare_id, common_id = tag_ids(conn, rare[0], common[0])
    retag(conn, 8, 1, {rare_id: (0.999, 1), common_id: (0.999, 1)})
    retag(conn, 12, 2, {})
    queries = [
        f"{common[0]} {rare[0]}",
        f"{rare[0]} {common[0]} {common[1]}",
        f"{common[0]} ({rare[0]} | {rare[1]}) -{common[1]}",
        f"{rare[0]} {rare[1]} {common[0]}",
    ]
    pages_match_full_ranking(conn, queries)
    assert len(used) == 3 * len(queries)
    used.clear()
    pages_match_full_ranking(conn, [f"{rare[0]} {rare[1]}", f"{common[0]} -{common[1]}"])
    assert not used  # nothing for the cache to bound: the walk serves these
    conn.close()


def test_budget_keeps_only_the_most_common_tags(index: Index) -> None:
    conn = connect(index.db)
    capacity = 60 + 60 // 4 + 4096
    cache = rankcache.build(conn, index.db, min_files=1, max_bytes=3 * 2 * capacity)
    counts = dict(
        conn.execute("SELECT tag_id, count(*) FROM scores WHERE selected = 1 GROUP BY tag_id")
    )
    assert len(cache.rows) == 3
    assert min(counts[t] for t in cache.rows) >= max(
        n for t, n in counts.items() if t not in cache.rows
    )
    conn.close()


def test_taggings_and_reindex_log_changed_files(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    make_index(db, {"/g/a.png": {"smile": 0.9}, "/g/b.png": {"smile": 0.2}})
    conn = connect(db)
    logged = [r[0] for r in conn.execute("SELECT file_id FROM score_changes ORDER BY seq")]
    assert sorted(logged) == sorted(r[0] for r in conn.execute("SELECT id FROM files"))
    seq = changes.current_seq(conn)
    model = conn.execute("SELECT name FROM models").fetchone()[0]
    reindex_model(
        conn, name=model, thresholds={**RULES, "general": 0.1}, tag_rules=TagRules(), floor=0.05
    )
    b = conn.execute("SELECT file_id FROM paths WHERE path = '/g/b.png'").fetchone()[0]
    assert changes.changed_since(conn, seq, 10) == [b]
    conn.close()


@pytest.fixture(scope="module", params=["all tags", "common tags"])
def cached(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    idx = build_index(tmp_path_factory.mktemp("cached"))
    conn = connect(idx.db)
    counts = sorted(
        n for (n,) in conn.execute("SELECT count(*) FROM scores WHERE selected = 1 GROUP BY tag_id")
    )
    cut = 1 if request.param == "all tags" else counts[len(counts) // 2]
    assert len(rankcache.build(conn, idx.db, min_files=cut).rows) < len(counts) or cut == 1
    girl, solo = tag_ids(conn, "1girl", "solo")
    for fid in (2, 11, 17):  # changed after the build: bounded from SQLite
        retag(conn, fid, 2, {girl: (0.97, 1), solo: (0.99, 1)})
    yield conn
    conn.close()


TAGS = ["1girl", "solo", "long_hair", "smile", "hat", "general:1girl", "(smile | hat)"]


@st.composite
def ranked_queries(draw) -> str:  # type: ignore[no-untyped-def]
    tags = draw(st.lists(st.sampled_from(TAGS), min_size=2, max_size=3, unique=True))
    extra = draw(st.lists(st.sampled_from(ATOMS), max_size=2))
    extra = [("-" + a) if draw(st.booleans()) else a for a in extra]
    return " ".join(draw(st.permutations([*tags, *extra])))


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=ranked_queries(), limit=st.integers(1, 30), offset=st.integers(0, 5))
def test_random_ranked_pages_match_the_full_ranking(
    cached, text: str, limit: int, offset: int
) -> None:
    node = parse(text)
    full = [(h.path, h.rank) for h in iter_search(cached, node, SearchOptions())]
    page = [
        (h.path, h.rank)
        for h in iter_search(cached, node, SearchOptions(limit=limit, offset=offset))
    ]
    assert page == full[offset : offset + limit]


def test_a_failed_write_leaves_the_old_cache_and_no_temporary_files(index: Index) -> None:
    conn = connect(index.db)
    rankcache.build(conn, index.db, min_files=1)
    before = sorted(p.name for p in index.db.parent.iterdir())
    meta = rankcache.meta_path(index.db).read_text()

    def disk_full(fh) -> None:  # type: ignore[no-untyped-def]
        fh.write(b"{")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(rankcache.meta_path(index.db), disk_full, mode=0o644)
    assert sorted(p.name for p in index.db.parent.iterdir()) == before
    assert rankcache.meta_path(index.db).read_text() == meta
    conn.close()
