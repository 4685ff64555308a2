"""Search semantics on a small real SQLite index, checked against a brute-force reference.

The reference evaluates the parsed tree in Python over the same rows; every query (listed
and hypothesis-generated) must give the same set of paths as the compiled SQL.
"""

from __future__ import annotations

import fnmatch
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tagd.index.db import connect
from tagd.search.execute import count, iter_search
from tagd.search.query import (
    And,
    FileFilter,
    Flag,
    Model,
    Node,
    Not,
    Or,
    Range,
    Rating,
    Score,
    Tag,
    TimeBound,
    parse,
)
from tagd.search.types import SearchOptions

GENERAL = ["1girl", "solo", "long_hair", "smile", "hat", "hat_ribbon", ">_<", ":d", "re:zero"]
CHARACTERS = ["hatsune_miku", "hakurei_reimu"]
RATINGS = ["general", "sensitive", "questionable", "explicit"]
MODELS = ["wd", "dd"]
NOW = time.time()


@dataclass
class Index:
    db: Path
    tags: dict[int, tuple[str, str]] = field(default_factory=dict)
    files: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # size, w, h
    scores: dict[tuple[int, int, int], tuple[float, int]] = field(default_factory=dict)
    taggings: set[tuple[int, int]] = field(default_factory=set)
    rows: list[tuple[str, int | None, int]] = field(default_factory=list)  # path, fid, mtime
    jobs: dict[str, str] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    reviews: dict[tuple[int, int], int] = field(default_factory=dict)  # (fid, tid): ±1


def build_index(tmp: Path, seed: int = 7) -> Index:
    rng = random.Random(seed)
    idx = Index(tmp / "t.db")
    conn = connect(idx.db)
    conn.execute("BEGIN")
    for mid, name in enumerate(MODELS, 1):
        conn.execute(
            "INSERT INTO models(id, name, family, source, settings, updated_at) "
            "VALUES (?, ?, 'wd14', 'x', ?, 0)",
            (mid, name, '{"thresholds": {"general": 0.35}}'),
        )
        idx.models[name] = mid
    names = [("general", n) for n in GENERAL] + [("character", n) for n in CHARACTERS]
    names += [("rating", r) for r in RATINGS]
    for tid, (ns, n) in enumerate(names, 1):
        conn.execute("INSERT INTO tags(id, namespace, name) VALUES (?, ?, ?)", (tid, ns, n))
        idx.tags[tid] = (ns, n)
    for fid in range(1, 61):
        size, w, h = (
            rng.randint(1, 5_000_000),
            rng.choice([640, 1920, 4000]),
            rng.choice([480, 1080]),
        )
        conn.execute(
            "INSERT INTO files(id, sha256, size, width, height, format, first_seen) "
            "VALUES (?, ?, ?, ?, ?, 'PNG', 0)",
            (fid, f"{fid:064x}", size, w, h),
        )
        idx.files[fid] = (size, w, h)
        for mid in idx.models.values():
            if rng.random() < 0.2:
                continue  # not processed by this model (yet)
            idx.taggings.add((fid, mid))
            conn.execute(
                "INSERT INTO taggings(file_id, model_id, floor, tagged_at) VALUES (?, ?, 0.05, 0)",
                (fid, mid),
            )
            top = rng.choice(RATINGS)
            for tid, (ns, _n) in idx.tags.items():
                if ns == "rating":
                    score = 0.9 if _n == top else rng.uniform(0.05, 0.3)
                    sel = int(_n == top)
                elif rng.random() < 0.5:
                    score = round(rng.uniform(0.05, 1.0), 3)
                    sel = int(score >= (0.85 if ns == "character" else 0.35))
                else:
                    continue
                idx.scores[(fid, mid, tid)] = (score, sel)
                conn.execute(
                    "INSERT INTO scores(file_id, model_id, tag_id, score, selected) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (fid, mid, tid, score, sel),
                )
        for k in range(rng.choice([1, 1, 1, 2])):
            sub = rng.choice(["a", "a/b", "c"])
            ext = rng.choice(["png", "JPG", "webp"])
            path = f"/g/{sub}/f{fid}_{k}.{ext}"
            mtime = int((NOW - rng.uniform(0, 30 * 86400)) * 1e9)
            missing = int(rng.random() < 0.05)
            conn.execute(
                "INSERT INTO paths(path, file_id, size, mtime_ns, missing, last_seen) "
                "VALUES (?, ?, ?, ?, ?, 0)",
                (path, fid, size, mtime, missing),
            )
            if not missing:
                idx.rows.append((path, fid, mtime))
    for j, state in enumerate(["failed", "failed", "queued", "done"]):
        path = f"/g/a/bad{j}.png"
        conn.execute(
            "INSERT INTO jobs(path, state, mtime_ns, created_at, updated_at) "
            "VALUES (?, ?, ?, 0, 0)",
            (path, state, int(NOW * 1e9)),
        )
        idx.jobs[path] = state
    conn.execute("COMMIT")
    conn.close()
    return idx


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return build_index(tmp_path_factory.mktemp("sem"))


@pytest.fixture(scope="module")
def conn(index: Index):
    c = connect(index.db, readonly=True)
    yield c
    c.close()


def _tag_match(idx: Index, tid: int, tag: Tag) -> bool:
    ns, name = idx.tags[tid]
    if tag.namespace is not None and ns != tag.namespace:
        return False
    return fnmatch.fnmatchcase(name, tag.name.replace("[", "[[]").replace("?", "[?]"))


def add_reviews(idx: Index, seed: int = 11) -> Index:
    """Human verdicts on about half the files: accepted and rejected tags of every kind,
    ratings included (some files get a human rating that differs from the models')."""
    rng = random.Random(seed)
    conn = connect(idx.db)
    conn.execute("BEGIN")
    for fid in idx.files:
        if rng.random() < 0.5:
            continue
        for tid in rng.sample(sorted(idx.tags), rng.randint(1, 4)):
            verdict = rng.choice([1, -1])
            idx.reviews[(fid, tid)] = verdict
            conn.execute(
                "INSERT INTO reviews(file_id, tag_id, verdict, at, by) VALUES (?, ?, ?, 0, 't')",
                (fid, tid, verdict),
            )
    conn.execute("COMMIT")
    conn.close()
    return idx


def _human_rating(idx: Index, fid: int) -> bool:
    return any(
        f == fid and v == 1 and idx.tags[t][0] == "rating" for (f, t), v in idx.reviews.items()
    )


def _overridden(idx: Index, fid: int, tid: int) -> bool:
    """A person rejected the tag, or rated the file with another rating: model rows for the
    pair do not count."""
    verdict = idx.reviews.get((fid, tid))
    if verdict == -1:
        return True
    return verdict is None and idx.tags[tid][0] == "rating" and _human_rating(idx, fid)


def tag_confidence(
    idx: Index, fid: int, tid: int, rng: Range | None, mids: set[int]
) -> float | None:
    """One tag's confidence on a file for a tag term (rng None: selected rows) or a
    confidence filter: 1.0 for a tag a person gave, else the best model score that counts
    (not rejected, not re-rated by a person); None: none."""
    if idx.reviews.get((fid, tid)) == 1:
        return 1.0 if rng is None or rng.contains(1.0) else None
    if _overridden(idx, fid, tid):
        return None
    found = [
        sc
        for (f, m, t), (sc, sel) in idx.scores.items()
        if f == fid and t == tid and m in mids and (sel if rng is None else rng.contains(sc))
    ]
    return max(found, default=None)


def confidence(idx: Index, fid: int, term: Tag | Score, mids: set[int]) -> float | None:
    """A term's confidence on a file: the best of the tags it names."""
    tag = term if isinstance(term, Tag) else term.tag
    rng = None if isinstance(term, Tag) else term.range
    found = [
        c
        for tid in idx.tags
        if _tag_match(idx, tid, tag) and (c := tag_confidence(idx, fid, tid, rng, mids)) is not None
    ]
    return max(found, default=None)


def _scope(idx: Index, model: str | None) -> set[int]:
    return set(idx.models.values()) if model is None else {idx.models[model]}


def evaluate(
    idx: Index,
    node: Node,
    path: str,
    fid: int | None,
    mtime: int,
    model: str | None,
    untagged: bool = False,
) -> bool:
    mids = _scope(idx, model)

    def stored(tag: Tag):
        return [
            (m, t, s, sel)
            for (f, m, t), (s, sel) in idx.scores.items()
            if f == fid and m in mids and _tag_match(idx, t, tag)
        ]

    if isinstance(node, And):
        return all(evaluate(idx, t, path, fid, mtime, model, untagged) for t in node.terms)
    if isinstance(node, Or):
        return any(evaluate(idx, t, path, fid, mtime, model, untagged) for t in node.terms)
    if isinstance(node, Not):
        return not evaluate(idx, node.term, path, fid, mtime, model, untagged)
    if isinstance(node, Flag):
        if node.name == "failed":
            return idx.jobs.get(path) == "failed"
        if node.name in ("reviewed", "source:human"):
            least = 1 if node.name == "source:human" else -1
            return any(f == fid and v >= least for (f, _), v in idx.reviews.items())
        return not any((fid, m) in idx.taggings for m in mids)
    if isinstance(node, Model):
        return untagged or (fid, idx.models[node.name]) in idx.taggings
    if isinstance(node, FileFilter) and node.key in ("path", "dir", "ext", "mtime"):
        return _path_filter(node, path, mtime)
    if fid is None:
        return isinstance(node, FileFilter) and node.key == "tags" and node.range.contains(0)
    if isinstance(node, Tag):
        return confidence(idx, fid, node, mids) is not None
    if isinstance(node, Score):
        if confidence(idx, fid, node, mids) is not None:
            return True
        if not node.range.contains(0.0):
            return False
        named = [t for t in idx.tags if _tag_match(idx, t, node.tag)]
        if any(_overridden(idx, fid, t) for t in named):
            return True  # a rejected (or re-rated) tag has confidence 0
        open_ = {t for t in named if (fid, t) not in idx.reviews and not _overridden(idx, fid, t)}
        if named and not open_:
            return False  # every tag it names has a verdict, read above
        have = {m for m, t, *_ in stored(node.tag) if t in open_}
        return any((fid, m) in idx.taggings and m not in have for m in mids)
    if isinstance(node, Rating):
        ratings = [t for t, (ns, name) in idx.tags.items() if ns == "rating" and name in node.names]
        return any(
            confidence(idx, fid, Tag(idx.tags[t][1], "rating", 0), mids) is not None
            for t in ratings
        )
    assert isinstance(node, FileFilter)
    if node.key == "tags":
        chosen = {
            t
            for (f, m, t), (s, sel) in idx.scores.items()
            if f == fid and m in mids and sel and not _overridden(idx, fid, t)
        }
        chosen |= {t for (f, t), v in idx.reviews.items() if f == fid and v == 1}
        return node.range.contains(len(chosen))
    size, w, h = idx.files[fid]
    return node.range.contains({"size": size, "width": w, "height": h}[node.key])


def _path_filter(node: FileFilter, path: str, mtime: int) -> bool:
    if node.key == "path":
        pat = node.text if node.text.startswith(("/", "*")) else "*/" + node.text
        return fnmatch.fnmatchcase(path, pat)
    if node.key == "dir":
        return path.startswith(os.path.abspath(node.text).rstrip("/") + "/")
    if node.key == "ext":
        return any(path.lower().endswith("." + e) for e in node.text.split(","))
    if node.key == "mtime":

        def ns(b: TimeBound) -> float:
            return ((NOW + b.seconds) if b.relative else b.seconds) * 1e9

        t = node.times
        lo_ok = t.lo is None or (mtime >= ns(t.lo) if t.lo_incl else mtime > ns(t.lo))
        hi_ok = t.hi is None or (mtime <= ns(t.hi) if t.hi_incl else mtime < ns(t.hi))
        return lo_ok and hi_ok
    raise AssertionError(node.key)


def scope_of(node: Node) -> str | None:
    """The reference's reading of the grammar: a top-level `model:NAME` term scopes the query."""
    terms = node.terms if isinstance(node, And) else (node,)
    return next((t.name for t in terms if isinstance(t, Model)), None)


def needs_jobs(node: Node) -> bool:
    if isinstance(node, Flag):
        return True
    if isinstance(node, Not):
        return needs_jobs(node.term)
    if isinstance(node, And | Or):
        return any(needs_jobs(t) for t in node.terms)
    return False


def reference(idx: Index, node: Node) -> set[str]:
    model = scope_of(node)
    rows = list(idx.rows)
    if needs_jobs(node):
        live = {p for p, _, _ in idx.rows}
        rows += [
            (p, None, int(NOW * 1e9)) for p, s in idx.jobs.items() if s != "done" and p not in live
        ]
    untagged = "untagged" in repr(node)
    return {p for p, fid, m in rows if evaluate(idx, node, p, fid, m, model, untagged)}


def sql_result(conn, node: Node) -> set[str]:
    opts = SearchOptions()
    hits = list(iter_search(conn, node, opts))
    paths = [h.path for h in hits]
    assert len(paths) == len(set(paths))
    assert count(conn, node, opts) == len(paths)
    return set(paths)


QUERIES = [
    "1girl",
    "1girl solo",
    "1girl solo -smile",
    "1girl | smile",
    "(1girl | smile) -hat",
    "-(1girl | smile) hat",
    "hat*",
    "character:*",
    "-character:* solo",
    "general:hatsune_miku",
    "character:hatsune_miku | character:hakurei_reimu",
    ">_< :d re:zero",
    "1girl:>0.8",
    "1girl:>=0.5 smile:0.3..0.6",
    "1girl:<0.1",
    "solo:..0.2",
    "hat*:>0.9",
    "rating:<=sensitive",
    "rating:>questionable",
    "rating:general",
    "model:wd 1girl",
    "model:dd -1girl smile",
    "model:wd 1girl:<0.2",
    "model:dd",
    "untagged",
    "model:wd untagged",
    "failed",
    "failed | solo",
    "-untagged hat",
    "path:/g/a/* 1girl",
    "path:b/*.webp",
    "dir:/g/a",
    "ext:png,webp smile",
    "ext:jpg",
    "width:>=1920",
    "height:1080 width:<4000",
    "size:>2MB",
    "size:1MB..3MB",
    "mtime:-7d..",
    "mtime:..-10d",
    "tags:<5",
    "model:dd tags:>=6",
]


@pytest.mark.parametrize("text", QUERIES)
def test_sql_matches_reference(index: Index, conn, text: str) -> None:
    node = parse(text)
    assert sql_result(conn, node) == reference(index, node)


def test_listed_queries_are_not_trivial(index: Index) -> None:
    sizes = [len(reference(index, parse(q))) for q in QUERIES]
    assert sum(1 for s in sizes if s > 0) >= len(QUERIES) - 2
    total = len(index.rows)
    assert sum(1 for s in sizes if s < total) >= len(QUERIES) - 4


ATOMS = [
    "1girl", "solo", "smile", "hat*", "character:*", "rating:<=sensitive", "long_hair:>0.7",
    "smile:<0.3", "ext:png", "width:>=1920", "untagged", "failed", ">_<", "tags:<8",
    "dir:/g/a", "size:<2MB", "mtime:-1d..", "path:*bad*",
]  # fmt: skip


@st.composite
def queries(draw, depth: int = 0) -> str:  # type: ignore[no-untyped-def]
    if depth > 2 or draw(st.booleans()):
        atom = draw(st.sampled_from(ATOMS))
        return ("-" + atom) if draw(st.integers(0, 4)) == 0 else atom
    parts = draw(st.lists(queries(depth + 1), min_size=2, max_size=3))
    joined = (" | " if draw(st.booleans()) else " ").join(parts)
    return f"({joined})" if draw(st.booleans()) else joined


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=queries())
def test_random_queries_match_reference(index: Index, conn, text: str) -> None:
    from tagd.search.query import QueryError

    try:
        node = parse(text)
    except QueryError:
        return  # e.g. only exclusions at the top level
    assert sql_result(conn, node) == reference(index, node)


def test_default_order_is_product_of_confidences(index: Index, conn) -> None:
    node = parse("1girl smile")
    hits = list(iter_search(conn, node, SearchOptions(with_tags=True)))
    assert len(hits) >= 3

    def best(fid: int, name: str) -> float:
        tid = next(t for t, (_, n) in index.tags.items() if n == name)
        return max(
            s for (f, m, t), (s, sel) in index.scores.items() if f == fid and t == tid and sel
        )

    expected = [best(h.file_id, "1girl") * best(h.file_id, "smile") for h in hits]
    assert [h.rank for h in hits] == pytest.approx(expected)
    assert expected == sorted(expected, reverse=True)
    assert set(hits[0].tags) == {"general:1girl", "general:smile"}


def test_sort_limit_offset(index: Index, conn) -> None:
    node = parse("solo")
    all_paths = [h.path for h in iter_search(conn, node, SearchOptions(sort="path"))]
    assert all_paths == sorted(all_paths)
    desc = [h.path for h in iter_search(conn, node, SearchOptions(sort="path", descending=True))]
    assert desc == all_paths[::-1]
    page = [h.path for h in iter_search(conn, node, SearchOptions(sort="path", limit=3, offset=2))]
    assert page == all_paths[2:5]
    by_mtime = list(iter_search(conn, node, SearchOptions(sort="mtime")))
    assert [h.mtime_ns for h in by_mtime] == sorted((h.mtime_ns for h in by_mtime), reverse=True)
    rand = {h.path for h in iter_search(conn, node, SearchOptions(sort="random"))}
    assert rand == set(all_paths)


@pytest.mark.parametrize("text", ["path:*", "solo", "failed | solo"])
def test_random_pages_are_one_seeded_order(index: Index, conn, text: str) -> None:
    """Pages of a seeded random sort tile the result: no repeats, none missed; the seed
    fixes the order and another seed gives another."""
    node = parse(text)

    def order(seed: int, limit: int | None = None, offset: int = 0) -> list[str]:
        opts = SearchOptions(sort="random", seed=seed, limit=limit, offset=offset)
        return [h.path for h in iter_search(conn, node, opts)]

    everything = order(11)
    assert sorted(everything) == sorted(reference(index, node))
    assert len(everything) > 20
    pages = [order(11, 7, offset) for offset in range(0, len(everything) + 7, 7)]
    assert [p for page in pages for p in page] == everything
    assert order(11) == everything
    others = [order(seed) for seed in (12, 2**40 + 11, 2**63 - 1)]
    assert all(sorted(o) == sorted(everything) and o != everything for o in others)
    assert len({tuple(o) for o in others}) == 3
    # The same order computed outside SQLite (for orders made from the bitmaps), one id at
    # a time and as a numpy array.
    import numpy as np

    from tagd.search.shuffle import key

    hits = list(iter_search(conn, node, SearchOptions(sort="random", seed=11)))
    by_key = sorted(hits, key=lambda h: (key(11, h.file_id or 0), h.file_id or 0, h.path))
    assert [h.path for h in by_key] == everything
    ids = np.array([h.file_id or 0 for h in hits], dtype=np.int64)
    assert key(11, ids).tolist() == [key(11, int(i)) for i in ids]
    ranks = {p: i for i, p in enumerate(everything)}
    # Not the order of paths or ids: a shuffle moves most files far from where they were.
    by_path = sorted(everything)
    assert sum(abs(ranks[p] - i) > 2 for i, p in enumerate(by_path)) > len(everything) // 2


@pytest.mark.parametrize(
    "text",
    [
        "1girl",
        "1girl smile",
        "solo -hat long_hair:>0.3",
        "model:dd smile ext:png",
        "hat",
        "1girl:>0.2",
        "smile:0.3..0.9 -hat",
        "model:wd rating:general:>0.1 width:>700",
        "smile | hat",
        "(1girl | smile:>0.6) -hat",
        "(1girl | hat*) solo",
        "hat*",
        "hat* smile",
        "character:* 1girl",
        "hat*:>0.5 -solo",
        "(hat* | smile) 1girl",
    ],
)
@pytest.mark.parametrize(("limit", "offset"), [(1, 0), (5, 2), (40, 0)])
@pytest.mark.parametrize("first_batch", [1, 3, 256])
def test_ranked_page_equals_full_ranking(
    conn, monkeypatch, text: str, limit: int, offset: int, first_batch: int
) -> None:
    import tagd.search.plan

    monkeypatch.setattr(tagd.search.plan, "TOPK_FIRST_BATCH", first_batch)
    node = parse(text)
    full = [(h.path, h.rank) for h in iter_search(conn, node, SearchOptions())]
    page = [
        (h.path, h.rank) for h in iter_search(conn, node, SearchOptions(limit=limit, offset=offset))
    ]
    assert page == full[offset : offset + limit]


def test_wildcards_are_walked_as_the_or_of_their_tags(conn) -> None:
    """A ranked page of a wildcard walks its tags' lists, not every match (#17: `tag_01*`
    ranked all its matches at 1M files)."""
    from tagd.search.plan import WALK_MAX_TAGS, _driver

    ids = {n: i for i, n in conn.execute("SELECT id, name FROM tags")}
    page = SearchOptions(limit=5)
    walks = _driver(conn, parse("hat*"), page)
    assert walks is not None
    assert sorted(t for t, _ in walks) == sorted(i for n, i in ids.items() if n.startswith("hat"))
    walks = _driver(conn, parse("character:* 1girl"), page)
    assert walks is not None and {t for t, _ in walks} <= {ids[n] for n in [*CHARACTERS, "1girl"]}
    mixed, alone = _driver(conn, parse("smile:<0.3 hat*"), page), walks_of(conn, "hat*")
    assert mixed and alone and [t for t, _ in mixed] == [t for t, _ in alone]
    assert len(ids) <= WALK_MAX_TAGS
    assert _driver(conn, parse("*"), page) is not None


def walks_of(conn, text: str) -> list | None:  # type: ignore[no-untyped-def]
    """The walks of one term alone; a range holding 0 (smile:<0.3) has none, so it never drives."""
    from tagd.search.plan import _driver

    return _driver(conn, parse(text), SearchOptions(limit=5))


# -- item 12: long and deeply nested queries, against the reference, with a time bound --------


@st.composite
def deep_queries(draw, depth: int = 0) -> str:  # type: ignore[no-untyped-def]
    """Nesting up to (and past) MAX_DEPTH, with wide ORs and ANDs along the way."""
    from tagd.search.query import MAX_DEPTH

    if depth >= MAX_DEPTH + 2 or (depth > 2 and draw(st.integers(0, 5)) == 0):
        return draw(st.sampled_from(ATOMS))
    inner = draw(deep_queries(depth + 1))
    siblings = draw(st.lists(st.sampled_from(ATOMS), max_size=6))
    joined = (" | " if draw(st.booleans()) else " ").join([inner, *siblings])
    return f"solo -({joined})" if draw(st.integers(0, 3)) == 0 else f"({joined})"


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=deep_queries())
def test_item12_deep_queries_match_reference_in_time(index: Index, conn, text: str) -> None:
    from tagd.search.query import QueryError

    start = time.perf_counter()
    try:
        node = parse(text)
    except QueryError as exc:
        assert 0 <= exc.column <= len(text)
        assert time.perf_counter() - start < 1.0
        return
    assert sql_result(conn, node) == reference(index, node)
    page = list(iter_search(conn, node, SearchOptions(limit=3)))
    assert len(page) <= 3
    assert time.perf_counter() - start < 5.0  # generous: two shared cores, three SQL runs


def test_item12_widest_query_runs(index: Index, conn) -> None:
    """At the term limit, and an OR wider than SQLite's 127 arguments to max() (built
    directly, past the parser's limit): results, not an SQLite error."""
    from tagd.search.query import MAX_TERMS

    wide = parse(" | ".join(["smile:>0.1", "hat*", "1girl"] * (MAX_TERMS // 3)))
    assert sql_result(conn, wide) == reference(index, wide)
    tags = [Tag(name, None, 0) for name in ("1girl", "solo", "smile", "hat")] * 50
    very_wide = Or(tuple(tags))
    assert sql_result(conn, very_wide) == reference(index, very_wide)
    ranked = list(iter_search(conn, very_wide, SearchOptions(limit=5)))
    assert len(ranked) == 5


# -- human review (migration 0011) in every term: the reference reads `Index.reviews` --------


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Index:
    return add_reviews(build_index(tmp_path_factory.mktemp("reviewed")))


@pytest.fixture(scope="module")
def rconn(reviewed: Index):
    c = connect(reviewed.db, readonly=True)
    yield c
    c.close()


REVIEW_QUERIES = [
    *QUERIES,
    "reviewed",
    "source:human 1girl",
    "-reviewed smile:>0.5",
    "rating:explicit",
    "rating:<=sensitive -rating:general",
    "hat*:>0.95",
    "hat*:<0.2",
    "character:*:0.99..1",
    "tags:>=8",
    "tags:<3 reviewed",
    "model:wd tags:5..7",
    "model:dd rating:>sensitive smile:<0.5",
]


@pytest.mark.parametrize("text", REVIEW_QUERIES)
def test_reviews_apply_to_every_term(reviewed: Index, rconn, text: str) -> None:
    node = parse(text)
    assert sql_result(rconn, node) == reference(reviewed, node)


def test_reviews_change_what_the_listed_queries_match(reviewed: Index) -> None:
    """The verdicts are not decoration: without them most of these terms match other files."""
    plain = Index(reviewed.db, reviewed.tags, reviewed.files, reviewed.scores, reviewed.taggings)
    plain.rows, plain.jobs, plain.models = reviewed.rows, reviewed.jobs, reviewed.models
    for text in ("1girl:>0.8", "solo:..0.2", "rating:general", "tags:<5", "hat*", "smile"):
        node = parse(text)
        assert reference(reviewed, node) != reference(plain, node), text


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=queries())
def test_random_queries_with_reviews_match_reference(reviewed: Index, rconn, text: str) -> None:
    from tagd.search.query import QueryError

    try:
        node = parse(text)
    except QueryError:
        return
    assert sql_result(rconn, node) == reference(reviewed, node)


def rank_of(idx: Index, node: Node, fid: int, mids: set[int]) -> float | None:
    """The rank the engine must give: confidences multiplied over AND, best branch of an OR
    (a branch without a rank factor counts 1), None where no term ranks."""
    if isinstance(node, Tag | Score):
        return confidence(idx, fid, node, mids) or 0.0
    if isinstance(node, And):
        parts = [r for t in node.terms if (r := rank_of(idx, t, fid, mids)) is not None]
        return None if not parts else math.prod(parts)
    if isinstance(node, Or):
        parts = [rank_of(idx, t, fid, mids) for t in node.terms]
        if all(p is None for p in parts):
            return None
        return max(1.0 if p is None else p for p in parts)
    return None


def reported_tags(idx: Index, node: Node, fid: int, mids: set[int]) -> dict[str, float]:
    """What a hit reports: each tag named by a term not under a NOT, with its confidence."""
    out: dict[str, float] = {}
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, And | Or):
            stack.extend(n.terms)
        elif isinstance(n, Tag | Score):
            tag = n if isinstance(n, Tag) else n.tag
            rng = None if isinstance(n, Tag) else n.range
            for tid, (ns, name) in idx.tags.items():
                c = tag_confidence(idx, fid, tid, rng, mids) if _tag_match(idx, tid, tag) else None
                if c is not None:
                    out[f"{ns}:{name}"] = max(out.get(f"{ns}:{name}", 0.0), c)
    return out


@pytest.mark.parametrize(
    "text",
    [
        "1girl smile",
        "hat* solo",
        "1girl:>0.5 (smile | hat)",
        "rating:general:>0.1 solo",
        "smile:>0.9 | 1girl:0.2..1",
        "character:*",
    ],
)
def test_reviewed_ranks_and_reported_scores_are_the_effective_confidences(
    reviewed: Index, rconn, text: str
) -> None:
    """A tag a person gave ranks and reports 1.0; rejected and re-rated model rows neither
    rank nor report; ranked pages agree with the full ranking."""
    node = parse(text)
    mids = set(reviewed.models.values())
    hits = list(iter_search(rconn, node, SearchOptions(with_tags=True)))
    assert len(hits) >= 3
    for h in hits:
        assert h.rank == pytest.approx(rank_of(reviewed, node, h.file_id, mids)), h.path
        assert h.tags == pytest.approx(reported_tags(reviewed, node, h.file_id, mids)), h.path
    assert [h.rank for h in hits] == sorted((h.rank for h in hits), reverse=True)
    full = [(h.path, h.rank) for h in hits]
    for limit, offset in ((1, 0), (4, 3), (40, 0)):
        page = iter_search(rconn, node, SearchOptions(limit=limit, offset=offset))
        assert [(h.path, h.rank) for h in page] == full[offset : offset + limit]


def test_explain_says_how_verdicts_change_each_term(reviewed: Index, rconn, conn) -> None:
    from tagd.search.explain import explain

    text = "1girl smile:<0.5 rating:<=sensitive reviewed"
    judged = explain(parse(text), rconn)
    assert "a person's verdict overrides: accepted matches, rejected does not" in judged
    assert "a tag a person accepted counts 1.0, one rejected 0" in judged
    assert "a rating a person gave replaces the models'" in judged
    assert "reviewed (files with any human verdict)" in judged
    plain = explain(parse(text), conn)  # no verdicts in this index: nothing about them
    assert "person" not in plain
