"""Unlimited output from the bitmaps (tagd/search/stream.py): the same hits in the same order as
SQLite's, for every sort, with stale caches, non-UTF-8 names and NULL mtimes; and `tagd search`
writes the same bytes either way."""

from __future__ import annotations

import io
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_bitmaps import BITMAP_ATOMS, _mutate, queries
from test_search_semantics import QUERIES, Index, build_index

from tagd.commands.search import write_hits, write_paths
from tagd.index import sidecache
from tagd.index.db import connect
from tagd.names import from_db
from tagd.search import bitmaps, stream
from tagd.search.execute import iter_search, unlimited_paths
from tagd.search.query import parse
from tagd.search.types import Hit, Resolved, SearchOptions

ORDERS = [
    SearchOptions(),
    SearchOptions(descending=False),
    SearchOptions(sort="mtime"),
    SearchOptions(sort="mtime", descending=False),
    SearchOptions(sort="path"),
    SearchOptions(sort="path", descending=True),
    SearchOptions(offset=3, with_tags=True),
]
# Listed queries the bitmaps evaluate exactly (the others must be left to SQLite).
STREAMED = [
    "1girl", "1girl solo", "1girl solo -smile", "1girl | smile", "(1girl | smile) -hat",
    "-(1girl | smile) hat", "hat*", "character:*", "-character:* solo", "general:hatsune_miku",
    "character:hatsune_miku | character:hakurei_reimu", ">_< :d re:zero", "rating:<=sensitive",
    "rating:>questionable", "rating:general", "* -rating:general", "rating:general | solo",
]  # fmt: skip


def add_odd_paths(db: Path) -> None:
    """A name that is not UTF-8 (sorted by its bytes), and paths without an mtime."""
    conn = sqlite3.connect(db)
    conn.execute(
        "INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
        "VALUES (CAST(? AS TEXT), 1, 1, 5, 0, 0)",
        (b"/g/a/caf\xe9-\xff.png",),
    )
    conn.execute(
        "INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
        "VALUES ('/g/a/\u00e9t\u00e9.png', 2, 1, 5, 0, 0)"
    )
    conn.execute("UPDATE paths SET mtime_ns = NULL WHERE file_id IN (3, 4, 5)")
    conn.commit()
    conn.close()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Index:
    index = build_index(tmp_path_factory.mktemp("stream"))
    add_odd_paths(index.db)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    conn.close()
    return index


@pytest.fixture
def rconn(built: Index):
    c = connect(built.db, readonly=True)
    yield c
    c.close()


def through_sqlite(
    conn: sqlite3.Connection, text: str, opts: SearchOptions, monkeypatch: pytest.MonkeyPatch
) -> list[Hit]:
    with monkeypatch.context() as m:
        m.setenv("TAGD_BITMAPS", "off")
        return list(iter_search(conn, parse(text), opts))


def streamed(conn: sqlite3.Connection, db: Path, text: str, opts: SearchOptions) -> list | None:
    found = stream.rows(conn, str(db), parse(text), opts, Resolved())
    return None if found is None else list(found.rows())


@pytest.mark.parametrize("opts", ORDERS, ids=lambda o: f"{o.sort}-{o.descending}-{o.offset}")
def test_streamed_hits_equal_sqlite_in_every_order(
    built: Index, rconn, opts: SearchOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    for text in QUERIES:
        got = list(iter_search(rconn, parse(text), opts))
        assert got == through_sqlite(rconn, text, opts, monkeypatch), text
        served = streamed(rconn, built.db, text, opts) is not None
        assert served == (text in STREAMED), text


@pytest.mark.parametrize("opts", ORDERS, ids=lambda o: f"{o.sort}-{o.descending}-{o.offset}")
def test_unlimited_paths_are_sqlites_paths_as_bytes(
    rconn, opts: SearchOptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paths-only stream (what `tagd search -0` writes) reads mtimes only for --sort mtime."""
    for text in STREAMED:
        paths = unlimited_paths(rconn, parse(text), opts)
        want = [os.fsencode(h.path) for h in through_sqlite(rconn, text, opts, monkeypatch)]
        assert paths == want, text


def test_ties_nulls_and_odd_names_are_exercised(built: Index, rconn) -> None:
    """The comparisons above would not see a wrong tie-break, NULL or byte order otherwise."""
    found = streamed(rconn, built.db, "*", SearchOptions())
    assert found is not None
    ranks = [r[3] for r in found]
    assert len(set(ranks)) < len(ranks)  # tied ranks: path decides
    assert any(r[2] is None for r in found)
    paths = [r[0] for r in found]
    assert b"/g/a/caf\xe9-\xff.png" in paths and "/g/a/été.png".encode() in paths
    by_path = streamed(rconn, built.db, "*", SearchOptions(sort="path"))
    assert by_path is not None
    assert [r[0] for r in by_path] == sorted(paths)
    hits = list(iter_search(rconn, parse("*"), SearchOptions(sort="path")))
    assert from_db(b"/g/a/caf\xe9-\xff.png") in [h.path for h in hits]


def test_long_paths_sort_in_python_like_numpy(
    built: Index, rconn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the numpy sort's memory budget, Python sorts the bytes: the same order."""
    for opts in ORDERS[:6]:
        want = streamed(rconn, built.db, "*", opts)
        monkeypatch.setattr(stream, "NUMPY_SORT_MAX_BYTES", 0)
        assert streamed(rconn, built.db, "*", opts) == want
        monkeypatch.undo()


def test_random_order_holds_the_same_hits(built: Index, rconn, monkeypatch) -> None:
    opts = SearchOptions(sort="random")
    got = list(iter_search(rconn, parse("1girl | hat*"), opts))
    want = through_sqlite(rconn, "1girl | hat*", opts, monkeypatch)
    assert sorted(h.path for h in got) == sorted(h.path for h in want)
    assert streamed(rconn, built.db, "1girl | hat*", opts) is not None


def test_seeded_random_stream_is_sqlites_seeded_order(built: Index, rconn, monkeypatch) -> None:
    """Unlimited `--sort random --seed N` output is the same order as the SQL's pages."""
    for seed in (0, 42, 2**40 + 7):
        opts = SearchOptions(sort="random", seed=seed)
        for text in ("1girl | hat*", "*"):
            assert streamed(rconn, built.db, text, opts) is not None
            got = [h.path for h in iter_search(rconn, parse(text), opts)]
            assert got == [h.path for h in through_sqlite(rconn, text, opts, monkeypatch)], text
    one = [h.path for h in iter_search(rconn, parse("*"), SearchOptions(sort="random", seed=1))]
    two = [h.path for h in iter_search(rconn, parse("*"), SearchOptions(sort="random", seed=2))]
    assert sorted(one) == sorted(two) and one != two


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=queries(BITMAP_ATOMS),
    opts=st.sampled_from(ORDERS[:6]),
)
def test_random_boolean_queries_stream_like_sqlite(
    built: Index, rconn, monkeypatch: pytest.MonkeyPatch, text: str, opts: SearchOptions
) -> None:
    found = streamed(rconn, built.db, text, opts)
    assert found is not None
    want = through_sqlite(rconn, text, opts, monkeypatch)
    assert [(from_db(r[0]), r[1], r[2], r[3]) for r in found] == [
        (h.path, h.file_id, h.mtime_ns, h.rank) for h in want
    ]


CHECK = ["1girl", "1girl solo -smile", "hat* | character:*", "* -rating:general", "*"]


def test_stale_cache_checks_changed_files_in_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index = build_index(tmp_path, seed=3)
    add_odd_paths(index.db)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    rng = random.Random(11)
    for round_ in range(3):
        _mutate(conn, rng, 12)
        for text in CHECK:
            for opts in ORDERS:
                assert streamed(conn, index.db, text, opts) is not None  # stale, still served
                got = list(iter_search(conn, parse(text), opts))
                assert got == through_sqlite(conn, text, opts, monkeypatch), (round_, text)
    monkeypatch.setattr(bitmaps, "DIRTY_MAX", 3)  # too stale: SQLite answers alone
    _mutate(conn, rng, 20)
    assert streamed(conn, index.db, "1girl", SearchOptions()) is None
    assert unlimited_paths(conn, parse("1girl"), SearchOptions()) is None
    conn.close()


def test_a_limit_another_database_or_bitmaps_off_leave_it_to_sqlite(
    built: Index, rconn, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert streamed(rconn, built.db, "1girl", SearchOptions()) is not None
    assert streamed(rconn, built.db, "1girl", SearchOptions(limit=5)) is None
    with monkeypatch.context() as m:
        m.setenv("TAGD_BITMAPS", "off")
        assert streamed(rconn, built.db, "1girl", SearchOptions()) is None
    meta = sidecache.read_meta(built.db, bitmaps.KIND, bitmaps.FORMAT)
    assert meta is not None
    monkeypatch.setattr(sidecache, "read_meta", lambda *_a: {**meta, "db_id": "another"})
    assert streamed(rconn, built.db, "1girl", SearchOptions()) is None


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
def test_write_paths_writes_what_write_hits_writes(encoding: str) -> None:
    paths = [b"/g/a.png", "/g/\u00e9.png".encode(), b"/g/caf\xe9.png"]
    hits = [Hit(from_db(p), None, {}) for p in paths]
    for nul in (True, False):
        outs = []
        for write in ("paths", "hits"):
            raw = io.BytesIO()
            out = io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape")
            if write == "paths":
                n = write_paths(paths if encoding == "utf-8" else paths[:2], nul, out)
            else:
                n = write_hits(iter(hits if encoding == "utf-8" else hits[:2]), "paths", nul, out)
            out.flush()
            outs.append((n, raw.getvalue()))
        assert outs[0] == outs[1]


@pytest.mark.slow
def test_cli_output_is_the_same_bytes_through_the_bitmaps(tmp_path: Path) -> None:
    index = build_index(tmp_path, seed=5)
    add_odd_paths(index.db)
    conn = connect(index.db)
    assert bitmaps.refresh(conn, index.db) == "built"
    _mutate(conn, random.Random(3), 6)  # stale: some files come from SQLite
    conn.close()
    models = [{"name": "wd", "path": str(tmp_path)}]
    cfg = write_config(
        tmp_path / "config.yaml",
        {"database": str(index.db), "watch": [str(tmp_path)], "models": models},
    )
    for args in (["*", "-0"], ["1girl", "-smile"], ["hat*", "-0", "--sort", "mtime"]):
        fast, slow = (search_bytes(cfg, args, off) for off in (False, True))
        assert fast.returncode == slow.returncode == 0, fast.stderr + slow.stderr
        assert fast.stdout == slow.stdout and fast.stdout, args
    assert b"/g/a/caf\xe9-\xff.png\0" in search_bytes(cfg, ["*", "-0"], False).stdout


def search_bytes(cfg: Path, args: list[str], off: bool) -> subprocess.CompletedProcess[bytes]:
    """stdout as bytes: a name that is not UTF-8 comes out as its own bytes."""
    env = {k: v for k, v in os.environ.items() if k not in ("TAGD_CONFIG", "TAGD_BITMAPS")}
    if off:
        env["TAGD_BITMAPS"] = "off"
    cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "search", *args]
    return subprocess.run(cmd, capture_output=True, env=env, timeout=60)


def _best_in_python(conn: sqlite3.Connection, name: str, top: int) -> list[float]:
    best = [0.0] * top
    for fid, score in conn.execute(
        "SELECT s.file_id, s.score FROM scores s JOIN tags t ON t.id = s.tag_id "
        "WHERE t.name = ? AND s.selected = 1",
        (name,),
    ):
        best[fid] = max(best[fid], score)
    return best


def test_split_scores_reassemble_the_stored_doubles(tmp_path: Path) -> None:
    """A tag's scores come back from SQLite as integer halves (hi, lo of score * 2^53) and
    must be the very doubles stored, at every magnitude; a score too small for the split is
    counted by SQLite and its tag read row by row."""
    index = build_index(tmp_path, seed=5)
    conn = connect(index.db)
    rng = random.Random(3)
    top = 1 + conn.execute("SELECT max(id) FROM files").fetchone()[0]
    tid = conn.execute("SELECT id FROM tags WHERE name = '1girl'").fetchone()[0]
    fids = [r[0] for r in conn.execute("SELECT file_id FROM scores WHERE tag_id = ?", (tid,))]
    odd = [1.0, 0.5, 2.0**-53, 1 - 2.0**-53, 0.1, 1 / 3, 3.0e-10, 7.123456789012345e-5]
    for i, fid in enumerate(fids):
        score = odd[i] if i < len(odd) else rng.random() * 10.0 ** -rng.randrange(0, 12)
        conn.execute(
            "UPDATE scores SET score = ?, selected = 1 WHERE file_id = ? AND tag_id = ?",
            (score, fid, tid),
        )
    conn.commit()
    cur = conn.cursor()
    tag = parse("1girl")
    assert isinstance(tag, stream.Tag)
    got = stream._best_scores(cur, tag, top)
    assert got.tolist() == _best_in_python(conn, "1girl", top)
    assert len(set(got.tolist())) > len(odd)

    # 2^-60 keeps bits below 2^-106 when split: that tag is read row by row, still exact.
    conn.execute(
        "UPDATE scores SET score = ? WHERE file_id = ? AND tag_id = ?",
        (2.0**-60 * (1 + 2.0**-52), fids[0], tid),
    )
    conn.commit()
    got = stream._best_scores(cur, tag, top)
    assert got.tolist() == _best_in_python(conn, "1girl", top)
    assert got[fids[0]] == 2.0**-60 * (1 + 2.0**-52)
    conn.close()


def test_tag_reads_apart_keep_their_connections_snapshot(tmp_path: Path) -> None:
    """Tag scores are read on connections of their own, in threads; one that sees a later
    state of the index (the change log moved on) is read again on the query's connection,
    so every rank comes from the one snapshot the query's paths come from."""
    index = build_index(tmp_path, seed=9)
    conn = connect(index.db)
    top = 1 + conn.execute("SELECT max(id) FROM files").fetchone()[0]
    tags = [parse("1girl"), parse("solo")]
    assert all(isinstance(t, stream.Tag) for t in tags)
    before = [_best_in_python(conn, t.name, top) for t in tags]  # type: ignore[attr-defined]

    cur = conn.cursor()
    conn.execute("BEGIN")
    reads = stream.TagReads(cur, top)
    reads.start(tags)  # type: ignore[arg-type]
    apart = [f.result() for f in reads.pending.values()]
    assert all(a is not None for a in apart)  # read in the threads, same snapshot
    assert [reads.best(t).tolist() for t in tags] == before  # type: ignore[arg-type]
    conn.execute("COMMIT")

    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM scores").fetchone()  # the snapshot starts here
    reads = stream.TagReads(cur, top)
    writer = connect(index.db)
    writer.execute(
        "UPDATE scores SET score = 0.999 WHERE selected = 1 AND tag_id IN "
        "(SELECT id FROM tags WHERE name IN ('1girl', 'solo'))"
    )
    writer.execute("UPDATE taggings SET tagged_at = tagged_at + 1")  # logs the change
    writer.commit()
    writer.close()
    reads.start(tags)  # type: ignore[arg-type]
    assert all(f.result() is None for f in reads.pending.values())  # a later snapshot
    assert [reads.best(t).tolist() for t in tags] == before  # type: ignore[arg-type]
    conn.execute("COMMIT")
    conn.close()
