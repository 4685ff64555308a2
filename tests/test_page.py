"""Limited pages in path, mtime and random order from the bitmaps (tagd/search/page.py), and
ranked pages of zero-inclusive confidence filters (plan.zero_driver): the same rows in the
same order as SQLite's own query, with stale caches, verdicts, odd names, NULL and tied
mtimes, through both the index walk and the fetch by id."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from test_bitmaps import _mutate
from test_search_semantics import QUERIES, REVIEW_QUERIES, Index, add_reviews, build_index
from test_stream import add_odd_paths

from tagd.index.db import connect
from tagd.search import bitmaps, page
from tagd.search.execute import iter_search
from tagd.search.query import parse
from tagd.search.types import Hit, Resolved, SearchOptions

PAGES = [(1, 0), (7, 0), (7, 5), (60, 3)]
ORDERS = [
    ("path", None),
    ("path", True),
    ("mtime", None),
    ("mtime", False),
    ("random", None),
]
SEEDS = (3, 2**40 + 1)


def tie_mtimes(db: Path) -> None:
    """Several paths share an mtime (copied folders keep it): path breaks the tie."""
    conn = sqlite3.connect(db)
    conn.execute("UPDATE paths SET mtime_ns = 1700000000000000000 WHERE id % 4 = 0")
    conn.commit()
    conn.close()


def prepare(tmp: Path, seed: int = 7, reviews: bool = False) -> Index:
    index = build_index(tmp, seed=seed)
    if reviews:
        index = add_reviews(index)
    add_odd_paths(index.db)
    tie_mtimes(index.db)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    conn.close()
    return index


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return prepare(tmp_path_factory.mktemp("page"))


def options(sort: str, desc: bool | None, limit: int, offset: int, seed: int) -> SearchOptions:
    return SearchOptions(
        sort=sort,
        descending=desc,
        limit=limit,
        offset=offset,
        seed=seed if sort == "random" else None,
    )


def via_sql(conn: sqlite3.Connection, text: str, opts: SearchOptions, mp) -> list[Hit]:  # type: ignore[no-untyped-def]
    with mp.context() as m:
        m.setenv("TAGD_BITMAPS", "off")
        return list(iter_search(conn, parse(text), opts))


def served(conn: sqlite3.Connection, db: Path, text: str, opts: SearchOptions) -> bool:
    return page.page(conn, str(db), parse(text), opts, Resolved()) is not None


def compare(conn, db: Path, texts: list[str], mp) -> int:  # type: ignore[no-untyped-def]
    """Every query, order and page equal to SQLite's; returns how many the bitmaps served."""
    n = 0
    for text in texts:
        for sort, desc in ORDERS:
            for limit, offset in PAGES:
                for seed in SEEDS if sort == "random" else SEEDS[:1]:
                    opts = options(sort, desc, limit, offset, seed)
                    got = list(iter_search(conn, parse(text), opts))
                    assert got == via_sql(conn, text, opts, mp), (text, opts)
                    n += served(conn, db, text, opts)
    return n


@pytest.mark.parametrize("walk", [False, True], ids=["fetch", "walk"])
def test_pages_equal_sqlite(built: Index, monkeypatch: pytest.MonkeyPatch, walk: bool) -> None:
    conn = connect(built.db, readonly=True)
    if walk:  # the index walk, in batches of 2 so that keyset pages and tie groups are crossed
        monkeypatch.setattr(page, "FETCH_MAX", 0)
        monkeypatch.setattr(page, "FIRST_BATCH", 2)
        monkeypatch.setattr(page, "MAX_BATCH", 3)
    n = compare(conn, built.db, [*QUERIES, "path:*"], monkeypatch)
    conn.close()
    assert n > 400  # most listed queries are served by the bitmaps, not by SQL


def test_odd_names_ties_and_null_mtimes_are_exercised(built: Index, monkeypatch) -> None:
    """The comparisons above would not see a wrong byte order, tie-break or NULL otherwise."""
    conn = connect(built.db, readonly=True)
    monkeypatch.setattr(page, "FETCH_MAX", 0)
    monkeypatch.setattr(page, "FIRST_BATCH", 2)
    rows = page.page(
        conn, str(built.db), parse("*"), SearchOptions("mtime", limit=10**6), Resolved()
    )
    assert rows is not None
    mtimes = [r[3] for r in rows]
    assert mtimes[-3:] == [None, None, None]  # NULL last, descending
    assert len(set(mtimes)) < len(mtimes)
    tied = [r[0] for r in rows if r[3] == 1700000000000000000]
    assert len(tied) > 3 and tied == sorted(
        tied, key=lambda p: p.encode("utf-8", "surrogateescape")
    )
    paths = [r[0] for r in rows]
    assert "/g/a/caf\udce9-\udcff.png" in paths and "/g/a/été.png" in paths
    conn.close()


def test_stale_cache_and_new_files_are_checked(tmp_path: Path, monkeypatch) -> None:
    index = prepare(tmp_path, seed=5)
    conn = connect(index.db)
    rng = random.Random(4)
    texts = [
        "1girl",
        "1girl solo -smile",
        "hat* | character:*",
        "* -rating:general",
        "smile:<0.3 solo",
    ]
    for _ in range(2):
        _mutate(conn, rng, 15)
        assert compare(conn, index.db, texts, monkeypatch) > 0
    conn.close()


def test_verdicts_are_checked_by_sqlite(tmp_path: Path, monkeypatch) -> None:
    index = prepare(tmp_path, seed=9, reviews=True)
    conn = connect(index.db, readonly=True)
    compare(
        conn,
        index.db,
        REVIEW_QUERIES[: len(QUERIES) // 2] + REVIEW_QUERIES[len(QUERIES) :],
        monkeypatch,
    )
    assert page.page(
        conn, str(index.db), parse("1girl"), SearchOptions("path", limit=5), Resolved(reviews=True)
    )
    conn.close()


def test_the_empty_web_query_is_the_present_set(built: Index) -> None:
    """`path:*` (what the web UI searches for an empty box) is evaluated by the bitmaps."""
    conn = connect(built.db, readonly=True)
    cache = bitmaps.Cache.open(built.db)
    assert cache is not None
    ev = bitmaps.Evaluator(conn, cache, lambda t: ("SELECT id FROM tags WHERE name = ?", [t.name]))
    assert ev.candidates(parse("path:*")) == (cache.present, True)
    assert ev.candidates(parse("1girl path:/g/*"))[1] is False  # a real pattern: SQLite checks
    with pytest.raises(bitmaps._Unsupported):
        ev.candidates(parse("path:/g/*"))
    conn.close()


ZERO = [
    "smile:<0.3 solo",
    "smile:<0.3",
    "1girl:<0.1",
    "solo:..0.2",
    "hat*:<0.5 1girl",
    "smile:0..0.6 -hat",
    "1girl smile:<0.5 solo",
    "nosuch:<0.5 1girl",
]


@pytest.mark.parametrize("first_batch", [1, 256])
def test_zero_ranked_pages_equal_the_full_ranking(
    built: Index, monkeypatch, first_batch: int
) -> None:
    """A filter that takes 0 ranks most matches 0: the files above 0 come from its stored
    scores, then the zeros in path order — as the full SQL ranking orders them."""
    import tagd.search.plan

    monkeypatch.setattr(tagd.search.plan, "TOPK_FIRST_BATCH", first_batch)
    conn = connect(built.db, readonly=True)
    mixed = 0
    for text in ZERO:
        node = parse(text)
        assert tagd.search.plan.zero_driver(conn, node, SearchOptions(limit=5)) is not None, text
        full = [(h.path, h.rank) for h in iter_search(conn, node, SearchOptions())]
        mixed += any(r == 0 for _, r in full) and any(r for _, r in full)
        for limit, offset in [(1, 0), (5, 2), (40, 0), (500, 10)]:
            opts = SearchOptions(limit=limit, offset=offset)
            got = [(h.path, h.rank) for h in iter_search(conn, node, opts)]
            assert got == full[offset : offset + limit], (text, limit, offset)
    assert mixed >= 5  # pages cross from ranked files to zeros
    conn.close()


def test_zero_ranked_pages_with_verdicts(tmp_path: Path) -> None:
    index = prepare(tmp_path, seed=2, reviews=True)
    conn = connect(index.db, readonly=True)
    for text in [*ZERO, "hat*:<0.2", "model:dd rating:>sensitive smile:<0.5"]:
        node = parse(text)
        full = [(h.path, h.rank) for h in iter_search(conn, node, SearchOptions())]
        for limit, offset in [(3, 0), (40, 4)]:
            got = [
                (h.path, h.rank)
                for h in iter_search(conn, node, SearchOptions(limit=limit, offset=offset))
            ]
            assert got == full[offset : offset + limit], (text, limit, offset)
    conn.close()
