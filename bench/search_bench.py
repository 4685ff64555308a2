"""Search, similar and cold-start latency on a synthetic gallery index.

`build` writes a tagd database with N files: a Zipf-like general tag distribution (a few
tags on most images, a long tail), ~40 stored scores per file (35 general, 4 ratings, a
character on 30% of files), selection at 0.35, one 1024-d float16 embedding per file.
`measure` prints p50/p95 of a fixed query set through the same code `tagd search` runs,
`similar` top-20 latency, a cold `tagd search` subprocess, and the DB size.

    nice python -m bench.search_bench /tmp/tagd-bench.db --files 1000000      # build + measure
    python -m bench.search_bench /tmp/tagd-bench.db --measure-only
    python -m bench.search_bench /tmp/tagd-bench.db --measure-only --dirty 5000
    python -m bench.search_bench /tmp/tagd-bench.db --measure-only --no-rank-cache
    python -m bench.search_bench /tmp/tagd-bench.db --measure-only --no-bitmaps
    python -m bench.search_bench /tmp/tagd-bench.db --measure-only --patch 5000

Measuring builds or refreshes the ranking cache next to the database first (as the daemon and
`tagd scan` do) and prints how long that took.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

COMMON = (
    "1girl",
    "solo",
    "long_hair",
    "looking_at_viewer",
    "smile",
    "blush",
    "open_mouth",
    "short_hair",
    "blue_eyes",
    "simple_background",
)
N_GENERAL = 5000
N_CHARACTER = 500
RATINGS = ("general", "sensitive", "questionable", "explicit")
GENERAL_PER_FILE = 35
THRESHOLD = 0.35
CHUNK = 20_000

QUERIES: dict[str, list[str]] = {
    "1 tag": ["1girl", "smile", "tag_0300", "tag_2000"],
    "2 tags": ["1girl solo", "long_hair blue_eyes", "smile tag_0300"],
    "3 tags": ["1girl solo long_hair", "smile blush tag_0100", "solo tag_0050 tag_0400"],
    "NOT": ["1girl -solo", "long_hair -tag_0100"],
    "OR": ["(smile | blush) long_hair", "tag_0100 | tag_0200 | tag_0300"],
    "confidence": ["1girl:>0.9", "tag_0100:0.5..0.8"],
    "rating/ns": ["rating:<=sensitive solo", "character:char_0003"],
    "wildcard": ["tag_01*", "character:* solo", "1girl -character:*", "tag_01* solo"],
}
# Unlimited `-0` output (every match, in order): about 480k and 450k paths at 1M.
UNLIMITED = ["smile", "1girl solo"]


def general_names() -> list[str]:
    return [*COMMON, *(f"tag_{i:04d}" for i in range(len(COMMON), N_GENERAL))]


def build(db: Path, n_files: int, dim: int, seed: int = 0, kind: str = "structured") -> None:
    from bench import embeddings
    from tagd.index.db import connect

    if db.exists():
        sys.exit(f"{db} exists: delete it or use --measure-only")
    connect(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -500000")
    conn.execute("DROP INDEX scores_by_tag")
    rng = np.random.default_rng(seed)
    conn.execute("BEGIN")
    conn.execute(
        "INSERT INTO models(id, name, family, source, revision, n_tags, settings, updated_at) "
        "VALUES (1, 'wd-bench', 'wd14', 'synthetic', 'r1', ?, '{}', 0)",
        (N_GENERAL + N_CHARACTER + 4,),
    )
    names = [("rating", r) for r in RATINGS]
    names += [("general", n) for n in general_names()]
    names += [("character", f"char_{i:04d}") for i in range(N_CHARACTER)]
    conn.executemany(
        "INSERT INTO tags(id, namespace, name) VALUES (?, ?, ?)",
        [(i + 1, ns, n) for i, (ns, n) in enumerate(names)],
    )
    conn.executemany(
        "INSERT INTO model_tags(model_id, idx, tag_id) VALUES (1, ?, ?)",
        [(i, i + 1) for i in range(len(names))],
    )
    conn.execute("COMMIT")
    rating_ids = np.arange(1, 5)
    general_ids = np.arange(5, 5 + N_GENERAL)
    char_ids = np.arange(5 + N_GENERAL, 5 + N_GENERAL + N_CHARACTER)
    # Zipf-like: the most common tag is on most images, rank 1000 on ~1%.
    log_w = -1.1 * np.log(np.arange(1, N_GENERAL + 1) + 1.5)
    char_p = 1.0 / np.arange(1, N_CHARACTER + 1)
    char_p /= char_p.sum()
    now_ns = time.time_ns()
    dirs = embeddings.directions(len(names), dim)
    t0 = time.perf_counter()
    for start in range(0, n_files, CHUNK):
        n = min(CHUNK, n_files - start)
        ids = np.arange(start + 1, start + n + 1)
        gumbel = log_w[None, :] - np.log(-np.log(rng.random((n, N_GENERAL))))
        picked = np.argpartition(-gumbel, GENERAL_PER_FILE, axis=1)[:, :GENERAL_PER_FILE]
        general = np.sort(general_ids[picked], axis=1)
        g_scores = rng.beta(0.9, 0.7, size=general.shape) * 0.95 + 0.05
        r_scores = rng.dirichlet(np.ones(4) * 0.6, size=n)
        has_char = rng.random(n) < 0.3
        chars = rng.choice(char_ids, size=n, p=char_p)
        c_scores = rng.random(n) * 0.6 + 0.4
        rows: list[tuple[int, int, int, float, int]] = []
        for k in range(n):
            fid = int(ids[k])
            top = int(np.argmax(r_scores[k]))
            for j in range(4):
                rows.append((fid, 1, int(rating_ids[j]), float(r_scores[k, j]), int(j == top)))
            gs = g_scores[k]
            for j, tid in enumerate(general[k].tolist()):
                rows.append((fid, 1, tid, float(gs[j]), int(gs[j] >= THRESHOLD)))
            if has_char[k]:
                cs = float(c_scores[k])
                rows.append((fid, 1, int(chars[k]), cs, int(cs >= 0.85)))
        vectors = embeddings.noise(rng, n, dim).astype("<f2")  # drawn either way: same files
        if kind == "structured":
            arr = np.asarray(rows, dtype=np.float64)
            scored = (arr[:, 0].astype(np.int64), arr[:, 2].astype(np.int64))
            vectors = embeddings.structured(
                start + 1, n, (*scored, arr[:, 3].astype(np.float32)), dirs
            ).astype("<f2")
        mtimes = now_ns - rng.integers(0, 3 * 365 * 86400 * 10**9, size=n)
        sizes = rng.integers(50_000, 8_000_000, size=n)
        widths = rng.choice([512, 768, 1024, 1200, 1920, 2048, 3840], size=n)
        heights = rng.choice([512, 768, 1080, 1200, 1600, 2160], size=n)
        exts = rng.choice(["png", "jpg", "webp"], size=n, p=[0.4, 0.5, 0.1])
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO files(id, sha256, size, width, height, format, first_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, 0)",
            [
                (int(f), f"{int(f):064x}", int(s), int(w), int(h), str(e).upper())
                for f, s, w, h, e in zip(ids, sizes, widths, heights, exts, strict=True)
            ],
        )
        conn.executemany(
            "INSERT INTO paths(id, path, file_id, size, mtime_ns, missing, last_seen) "
            "VALUES (?, ?, ?, ?, ?, 0, 0)",
            [
                (
                    int(f),
                    f"/srv/gallery/{int(f) % 997:03d}/img{int(f):07d}.{e}",
                    int(f),
                    int(s),
                    int(m),
                )
                for f, s, m, e in zip(ids, sizes, mtimes, exts, strict=True)
            ],
        )
        conn.executemany(
            "INSERT INTO scores(file_id, model_id, tag_id, score, selected) VALUES (?,?,?,?,?)",
            rows,
        )
        conn.executemany(
            "INSERT INTO taggings(file_id, model_id, revision, floor, tagged_at) "
            "VALUES (?, 1, 'r1', 0.05, 0)",
            [(int(f),) for f in ids],
        )
        conn.executemany(
            "INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) "
            "VALUES (?, 1, ?, 'float16', ?)",
            [(int(f), dim, vectors[k].tobytes()) for k, f in enumerate(ids)],
        )
        conn.execute("COMMIT")
        done = start + n
        rate = done / (time.perf_counter() - t0)
        print(f"\r{done:,} files ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    conn.execute("CREATE INDEX scores_by_tag ON scores(tag_id, selected, score)")
    conn.execute("ANALYZE")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    connect(db).close()
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def subset(src: Path, db: Path, n_files: int, embeddings: bool) -> None:
    """A smaller index: the first `n_files` files of a built one, copied in SQL (minutes, not
    the hour a fresh build takes on a loaded machine). The same distributions, a new db id,
    this checkout's migrations (the source is only read: its schema is left alone)."""
    from tagd.index.db import connect

    if db.exists():
        sys.exit(f"{db} exists: delete it or use --measure-only")
    connect(db).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -500000")
    conn.execute("ATTACH DATABASE ? AS src", (f"file:{src}?mode=ro",))
    conn.execute("DROP INDEX scores_by_tag")
    t = time.perf_counter()
    conn.execute("BEGIN")
    for table in ("models", "tags", "model_tags"):
        conn.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table}")
    conn.execute("INSERT INTO main.files SELECT * FROM src.files WHERE id <= ?", (n_files,))
    for table in ("paths", "scores", "taggings", *(("embeddings",) if embeddings else ())):
        conn.execute(
            f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE file_id <= ?", (n_files,)
        )
    conn.execute("COMMIT")
    conn.execute("CREATE INDEX scores_by_tag ON scores(tag_id, selected, score)")
    conn.execute("ANALYZE main")
    print(f"copied {n_files:,} files from {src} in {time.perf_counter() - t:.0f} s")
    conn.close()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def prepare_rank_cache(db: Path, use: bool, dirty: int) -> None:
    """Build or refresh the ranking cache as the daemon would, or set it aside; then mark
    `dirty` random files changed since it (a daemon tagging between two refreshes)."""
    from tagd.index.db import connect
    from tagd.search import rankcache

    conn = connect(db)  # applies newer migrations
    meta = rankcache.meta_path(db)
    aside = Path(f"{meta}.aside")
    if not use:
        if meta.exists():
            meta.replace(aside)
        print("ranking cache: not used")
        conn.close()
        return
    if aside.exists() and not meta.exists():
        aside.replace(meta)
    t = time.perf_counter()
    outcome = rankcache.refresh(conn, db)
    cache = rankcache.RankCache.open(db)
    assert cache is not None
    print(
        f"ranking cache: {outcome} in {time.perf_counter() - t:.1f} s, {len(cache.rows)} tags, "
        f"{cache.columns.nbytes / 2**20:.0f} MiB"
    )
    if dirty:
        n = conn.execute("SELECT max(id) FROM files").fetchone()[0]
        picked = np.random.default_rng(2).choice(np.arange(1, n + 1), dirty, replace=False)
        conn.execute("BEGIN")
        for fid in picked.tolist():
            conn.execute("DELETE FROM score_changes WHERE file_id = ?", (fid,))
            conn.execute("INSERT INTO score_changes(file_id) VALUES (?)", (fid,))
        conn.execute("COMMIT")
        print(f"ranking cache: {dirty:,} files marked changed since it (bounded from SQLite)")
    conn.close()


def prepare_bitmaps(db: Path, use: bool) -> None:
    """Build or refresh the posting-list bitmaps (tagd/bitmaps.py), or set them aside."""
    from tagd.index import sidecache
    from tagd.index.db import connect
    from tagd.search import bitmaps

    meta = sidecache.meta_path(db, bitmaps.KIND)
    aside = Path(f"{meta}.aside")
    if not use:
        if meta.exists():
            meta.replace(aside)
        print("bitmaps: not used")
        return
    if aside.exists() and not meta.exists():
        aside.replace(meta)
    conn = connect(db)
    t = time.perf_counter()
    outcome = bitmaps.refresh(conn, db)
    took = time.perf_counter() - t
    found = sidecache.read_meta(db, bitmaps.KIND, bitmaps.FORMAT)
    assert found is not None
    size = (db.parent / found["file"]).stat().st_size + meta.stat().st_size
    print(
        f"bitmaps: {outcome} in {took:.1f} s, {found['n_tags']:,} tags, "
        f"{len(found['namespaces'])} namespaces, {size / 2**20:.1f} MiB on disk"
    )
    conn.close()


def measure_bitmap_patch(db: Path, n: int) -> None:
    """Patch cost: `n` random files logged as changed (a daemon between two refreshes)."""
    from tagd.index.db import connect
    from tagd.search import bitmaps

    conn = connect(db)
    top = conn.execute("SELECT max(id) FROM files").fetchone()[0]
    picked = np.random.default_rng(3).choice(np.arange(1, top + 1), n, replace=False)
    conn.execute("BEGIN")
    for fid in picked.tolist():
        conn.execute("DELETE FROM score_changes WHERE file_id = ?", (fid,))
        conn.execute("INSERT INTO score_changes(file_id) VALUES (?)", (fid,))
    conn.execute("COMMIT")
    t = time.perf_counter()
    outcome = bitmaps.refresh(conn, db)
    print(f"bitmaps: {outcome} in {time.perf_counter() - t:.2f} s ({n:,} changed files)")
    conn.close()


def measure_counts(db: Path, repeats: int, sqlite_too: bool) -> None:
    """`--count` of every benchmark query: through the bitmaps (in process, p50/p95), and
    once through SQLite alone (TAGD_BITMAPS=off) for comparison."""
    from tagd.index.db import connect
    from tagd.search.execute import count
    from tagd.search.query import parse

    conn = connect(db, readonly=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'query':<32} {'count':>9} {'p50 ms':>8} {'p95 ms':>8} {'sqlite ms':>10}")
    p50s = []
    for text in [q for qs in QUERIES.values() for q in qs]:
        node = parse(text)
        n = count(conn, node)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            count(conn, node)
            times.append((time.perf_counter() - t) * 1000)
        slow = ""
        if sqlite_too:
            os.environ["TAGD_BITMAPS"] = "off"
            t = time.perf_counter()
            assert count(conn, node) == n, text
            slow = f"{(time.perf_counter() - t) * 1000:.0f}"
            del os.environ["TAGD_BITMAPS"]
        p50s.append(percentile(times, 0.5))
        print(
            f"{text:<32} {n:>9,} {percentile(times, 0.5):>8.1f} "
            f"{percentile(times, 0.95):>8.1f} {slow:>10}"
        )
    print(f"count p50 over the queries: median {percentile(p50s, 0.5):.1f} ms, max {max(p50s):.1f}")
    print(f"search process resident (anonymous) memory: {rss_mib():.0f} MiB")
    conn.close()


def measure_ann(db: Path, n_queries: int, patch: int, dupes: bool, noise_control: int) -> None:
    """The HNSW index: build, size, recall@20 against the exact scan over `n_queries` files
    and an ef_search x oversample sweep, top-20 latency in process and as a whole `tagd
    similar` process, `dupes` through it, a patch of `patch` files. Opens the database
    read-only: only cache files beside it are written."""
    from tagd.index import sidecache
    from tagd.index.db import connect
    from tagd.search import ann, similar
    from tagd.search.similar import EmbeddingIndex
    from tagd.service.queries import QueryServer

    conn = connect(db, readonly=True)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    t = time.perf_counter()
    exact = EmbeddingIndex.open(conn, db, None, changes_ok=False)
    n, dim = exact.matrix.shape
    print(f"similar: exact matrix ready in {time.perf_counter() - t:.1f} s ({n:,} x {dim})")
    t = time.perf_counter()
    outcome = similar.refresh_ann(conn, db, min_files=1)
    meta = sidecache.read_meta(db, ann.kind(exact.model_id), ann.FORMAT)
    assert meta is not None
    size = (db.parent / meta["file"]).stat().st_size
    print(
        f"ann: {outcome} in {time.perf_counter() - t:.1f} s, {size / 2**20:.0f} MiB on disk "
        f"({ann.DTYPE}, M={ann.CONNECTIVITY}, ef_add={ann.EXPANSION_ADD}, "
        f"ef={ann.EXPANSION_SEARCH}, oversample {ann.OVERSAMPLE}; load "
        f"{os.getloadavg()[0]:.1f})"
    )
    rng = np.random.default_rng(5)
    picks = np.sort(rng.choice(exact.ids, n_queries, replace=False))
    t = time.perf_counter()
    truth_sims: dict[int, float] = {}
    truth = exact_top(exact, picks, 20, truth_sims)
    print(
        f"exact top-20 of {n_queries} files in {time.perf_counter() - t:.1f} s "
        f"(batched matrix products)"
    )
    graph = ann.Ann.open(conn, db, exact.model_id)
    assert graph is not None
    vectors = {int(f): similar.stored_vector(conn, exact.model_id, "", int(f)) for f in picks}
    oversample = ann.OVERSAMPLE
    sweep = [(ef, over) for ef in (64, 128, 256) for over in (1, 2, 4)]
    for ef, over in [*sweep, (512, 2), (1024, 2), (2048, 2)]:
        graph.index.expansion_search = ef
        ann.OVERSAMPLE = over
        times, recalls, gaps = [], [], []
        for fid in picks.tolist():
            t = time.perf_counter()
            got = graph.nearest(conn, vectors[fid], limit=20, exclude=fid)
            times.append((time.perf_counter() - t) * 1000)
            assert got is not None
            recalls.append(len(truth[fid] & {f for f, _ in got}) / 20)
            if recalls[-1] < 1 and len(got) == 20:
                # How far below the true 20th neighbour the 20th found one is: a near-tie?
                gaps.append(float(truth_sims[fid] - got[-1][1]))
        gap = f", 20th-sim gap of misses p50 {np.median(gaps):.4f}" if gaps else ""
        print(
            f"  ef_search {ef:>4} oversample {over}: recall@20 mean {np.mean(recalls):.4f} "
            f"min {min(recalls):.2f}, query p50 {percentile(times, 0.5):.2f} ms "
            f"p95 {percentile(times, 0.95):.2f} ms{gap}"
        )
    ann.OVERSAMPLE = oversample
    graph.index.expansion_search = ann.EXPANSION_SEARCH
    times = []
    for fid in picks[:200].tolist():
        t = time.perf_counter()
        similar.nearest_files(conn, db, None, int(fid), limit=20)
        times.append((time.perf_counter() - t) * 1000)
    print(
        f"similar.nearest_files top-20 (opens the index per call, as a command does): "
        f"p50 {percentile(times, 0.5):.2f} ms p95 {percentile(times, 0.95):.2f} ms"
    )
    times = []
    for fid in picks[:20].tolist():
        t = time.perf_counter()
        exact.nearest_to_file(int(fid), limit=20)
        times.append((time.perf_counter() - t) * 1000)
    print(f"exact scan top-20 in process: p50 {percentile(times, 0.5):.1f} ms")
    print(f"search process resident (anonymous) memory: {rss_mib():.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(
            f"database: {db}\nwatch: [{tmp}]\nmodels:\n  - name: wd-bench\n    path: {tmp}\n"
        )
        sha = conn.execute("SELECT sha256 FROM files WHERE id = ?", (int(picks[0]),)).fetchone()[0]
        server = QueryServer(db)  # what a running daemon holds
        for extra, asks in (([], False), (["--exact"], False), ([], True)):
            cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "similar", sha, *extra]
            if asks:
                server.start()
            env = {**os.environ, "TAGD_DAEMON_QUERIES": "on" if asks else "off"}
            times = []
            for _ in range(7):
                t = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                times.append(time.perf_counter() - t)
            how = "asking a daemon's socket" if asks else "answering itself"
            print(
                f"`tagd similar SHA256 {' '.join(extra)}` as a process, {how} (rc "
                f"{r.returncode}): p50 {percentile(times, 0.5) * 1000:.0f} ms, "
                f"min {min(times) * 1000:.0f} ms"
            )
        server.stop()
    if dupes:
        t = time.perf_counter()
        groups = similar.duplicate_groups(conn, db, None, 0.97, use_index=True)
        took = time.perf_counter() - t
        pairs = sum(len(g) - 1 for g in groups)
        print(f"dupes --min-sim 0.97 through the index: {took:.1f} s, {len(groups)} groups")
        planted = sum(1 + (b // 1000) % 4 for b in range(1, n + 1, 1000))
        print(f"  ({pairs} files joined to a group; {planted} planted near-duplicates)")
    if patch:
        top = int(exact.ids[-1])
        picked = np.random.default_rng(3).choice(np.arange(1, top + 1), patch, replace=False)
        measure_changed(conn, graph, picks[:100], vectors, np.sort(picked))
        t = time.perf_counter()
        done = ann.patch(conn, db, exact.model_id, meta, dirty=picked.tolist())
        print(f"ann: patched {done:,} changed files in {time.perf_counter() - t:.1f} s")
    conn.close()
    if noise_control:
        measure_noise_control(noise_control, dim)


def measure_changed(
    conn: sqlite3.Connection,
    graph: Any,
    picks: np.ndarray,
    vectors: dict[int, np.ndarray],
    changed: np.ndarray,
) -> None:
    """Top-20 with `changed` files left out of the graph and scored exactly, their rows read
    from a journal file (as the daemon leaves them between graph rewrites) or from SQLite
    (files changed after the journal); each query opens them anew, as a command does."""
    from tagd.search import ann

    empty = np.empty(0, dtype=np.int64)
    t = time.perf_counter()
    ids, rows = ann.rows_of(conn, graph.model_id, changed, graph.dim)
    print(f"ann: {len(changed):,} changed rows read from SQLite in {time.perf_counter() - t:.2f} s")
    with tempfile.TemporaryDirectory() as tmp:
        rows.astype("<f4").tofile(Path(tmp) / "bench.journal")
        ids.astype("<i8").tofile(Path(tmp) / "bench.journal-keys")
        meta: dict[str, Any] = {"journal": "bench.journal", "journal_keys": "bench.journal-keys"}
        meta["journal_rows"] = len(ids)
        journal = ann._journal(Path(tmp), meta, graph.dim)
        kept = set(changed.tolist())
        for label, source, late in (("journal", journal, empty), ("SQLite", None, changed)):
            times = []
            for fid in picks.tolist():
                g = dataclasses.replace(
                    graph, dirty=kept, _gone=changed, _journal=source, _late=late, _rows=None
                )
                t = time.perf_counter()
                g.nearest(conn, vectors[fid], limit=20, exclude=fid)
                times.append((time.perf_counter() - t) * 1000)
            print(
                f"  top-20 with {len(changed):,} changed files from the {label}: "
                f"p50 {percentile(times, 0.5):.2f} ms p95 {percentile(times, 0.95):.2f} ms"
            )


def exact_top(
    index: Any, picks: np.ndarray, k: int, kth: dict[int, float] | None = None
) -> dict[int, set[int]]:
    """Each picked file's exact top-k (itself left out), 256 queries per matrix product;
    `kth` receives each file's k-th best similarity."""
    out: dict[int, set[int]] = {}
    ids, rows = index.rows_for(picks)
    for start in range(0, len(ids), 256):
        q = rows[start : start + 256]
        sims = np.empty((len(q), index.matrix.shape[0]), dtype=np.float32)
        for lo in range(0, index.matrix.shape[0], 65536):
            sims[:, lo : lo + 65536] = q @ np.asarray(index.matrix[lo : lo + 65536]).T
        for j, fid in enumerate(ids[start : start + 256].tolist()):
            sims[j, index.ids == fid] = -np.inf
            top = np.argpartition(-sims[j], k)[:k]
            out[fid] = set(index.ids[top].tolist())
            if kth is not None:
                kth[fid] = float(sims[j, top].min())
    return out


def measure_noise_control(n: int, dim: int) -> None:
    """The same index settings on i.i.d. noise: no neighbourhood structure, so the "nearest"
    are arbitrary and no graph finds them. Printed for honesty, not as a recall figure."""
    from tagd.search import ann

    vecs = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = ann._new_index(dim)
    t = time.perf_counter()
    index.add(np.arange(n, dtype=np.uint64), vecs, threads=ann._threads())
    built = time.perf_counter() - t
    qs = np.random.default_rng(1).choice(n, 200, replace=False)
    recalls = []
    for q in qs.tolist():
        sims = vecs @ vecs[q]
        sims[q] = -np.inf
        want = set(np.argpartition(-sims, 20)[:20].tolist())
        keys = np.asarray(index.search(vecs[q], 20 * ann.OVERSAMPLE + 1).keys, dtype=np.int64)
        keys = keys[keys != q]
        got = keys[np.argsort(-(vecs[keys] @ vecs[q]))[:20]]
        recalls.append(len(want & set(got.tolist())) / 20)
    print(
        f"noise control ({n:,} i.i.d. Gaussian {dim}-d vectors, same settings, built in "
        f"{built:.0f} s): recall@20 {np.mean(recalls):.3f} -- no structure to find, see docs"
    )


def rss_mib() -> float:
    """Resident memory of this process, less file-backed pages (the memory-mapped caches)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    anon = int(fields.get("RssAnon", "0 kB").split()[0])
    total = int(fields.get("VmRSS", "0 kB").split()[0])
    return anon / 1024 if anon else total / 1024


def measure(
    db: Path, repeats: int, limit: int, skip_search: bool = False, dupes: bool = False
) -> None:
    from tagd.index.db import connect
    from tagd.search.execute import count, search
    from tagd.search.query import parse
    from tagd.search.types import SearchOptions

    conn = connect(db, readonly=True)
    print(
        f"database {db}: {db.stat().st_size / 2**30:.2f} GiB, "
        f"{conn.execute('SELECT count(*) FROM files').fetchone()[0]:,} files, "
        f"{conn.execute('SELECT max(rowid) FROM embeddings').fetchone()[0]:,} embeddings"
    )
    print(f"load average: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(
        f"{'shape':<11} {'query':<32} {'matches':>9} {'p50 ms':>8} {'p95 ms':>8} {'count p50':>10}"
    )
    for shape, queries in {} if skip_search else QUERIES.items():
        for text in queries:
            node = parse(text)
            opts = SearchOptions(limit=limit)
            times, ctimes = [], []
            search(conn, node, opts)
            for _ in range(repeats):
                t = time.perf_counter()
                search(conn, node, opts)
                times.append((time.perf_counter() - t) * 1000)
            for _ in range(3):
                t = time.perf_counter()
                n = count(conn, node, opts)
                ctimes.append((time.perf_counter() - t) * 1000)
            print(
                f"{shape:<11} {text:<32} {n:>9,} {percentile(times, 0.5):>8.1f} "
                f"{percentile(times, 0.95):>8.1f} {percentile(ctimes, 0.5):>10.1f}"
            )
    print(f"search process resident (anonymous) memory after the queries: {rss_mib():.0f} MiB")
    measure_similar(db, conn, repeats, dupes)
    measure_cold(db, limit)


def measure_similar(db: Path, conn: sqlite3.Connection, repeats: int, dupes: bool) -> None:
    from tagd.search.similar import EmbeddingIndex

    t = time.perf_counter()
    index = EmbeddingIndex.open(conn, db, None)
    print(
        f"similar: index open {time.perf_counter() - t:.2f} s "
        f"({index.matrix.shape[0]:,} x {index.matrix.shape[1]}, {index.matrix.dtype})"
    )
    times = []
    rng = np.random.default_rng(1)
    for fid in rng.integers(1, index.matrix.shape[0], size=repeats).tolist():
        t = time.perf_counter()
        index.nearest_to_file(int(fid), limit=20)
        times.append((time.perf_counter() - t) * 1000)
    print(
        f"similar top-20: p50 {percentile(times, 0.5):.0f} ms, p95 {percentile(times, 0.95):.0f} ms"
    )
    if dupes:
        from tagd.search.similar import lsh_plan

        bits, bands = lsh_plan(index.matrix.shape[0], 0.97)
        t = time.perf_counter()
        groups = index.groups(0.97)
        print(
            f"dupes --min-sim 0.97 (LSH, {bands} bands of {bits} bits): "
            f"{time.perf_counter() - t:.0f} s, {len(groups)} groups"
        )


def measure_cold(db: Path, limit: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(
            f"database: {db}\nwatch: [{tmp}]\nmodels:\n  - name: wd-bench\n    path: {tmp}\n"
        )
        cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "similar", f"{12345:064x}"]
        times = []
        for _ in range(5):
            t = time.perf_counter()
            r = subprocess.run([*cmd, "--limit", "20"], capture_output=True, text=True)
            times.append(time.perf_counter() - t)
        print(
            f"cold `tagd similar SHA256 --limit 20` (process start to exit, cached index, "
            f"rc {r.returncode}): p50 {percentile(times, 0.5) * 1000:.0f} ms"
        )
        for query in ("1girl", "1girl solo", "1girl solo long_hair"):
            cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "search", query]
            cmd += ["--limit", str(limit)]
            times = []
            for _ in range(5):
                t = time.perf_counter()
                r = subprocess.run(cmd, capture_output=True, text=True)
                times.append(time.perf_counter() - t)
                if r.returncode != 0:
                    print(f"cold start failed: {r.stderr.strip()}")
                    return
            print(
                f"cold `tagd search '{query}' --limit {limit}` (process start to exit): "
                f"p50 {percentile(times, 0.5) * 1000:.0f} ms, min {min(times) * 1000:.0f} ms"
            )


def children_cpu() -> float:
    """CPU seconds of finished child processes: on a shared machine, what a run costs
    without the time it waited for a core."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_unlimited(db: Path, repeats: int, sqlite_too: bool) -> None:
    """Whole-process `tagd search Q -0` with no limit, through the bitmaps (p50 of `repeats`)
    and once through SQLite (TAGD_BITMAPS=off), checking that both write the same bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(
            f"database: {db}\nwatch: [{tmp}]\nmodels:\n  - name: wd-bench\n    path: {tmp}\n"
        )
        for query in UNLIMITED:
            for sort in ("score", "path", "mtime"):
                cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "search", query]
                cmd += ["-0", "--sort", sort]
                times, cpus, out = [], [], b""
                for _ in range(repeats):
                    t, c = time.perf_counter(), children_cpu()
                    out = subprocess.run(cmd, capture_output=True, check=True).stdout
                    times.append(time.perf_counter() - t)
                    cpus.append(children_cpu() - c)
                line = (
                    f"unlimited `tagd search '{query}' -0 --sort {sort}`: {out.count(0)} paths, "
                    f"bitmaps p50 {percentile(times, 0.5):.2f} s min {min(times):.2f} s, "
                    f"CPU (user+sys) p50 {percentile(cpus, 0.5):.2f} s"
                )
                if sqlite_too:
                    env = {**os.environ, "TAGD_BITMAPS": "off"}
                    t, c = time.perf_counter(), children_cpu()
                    slow = subprocess.run(cmd, capture_output=True, check=True, env=env).stdout
                    line += (
                        f"; SQLite {time.perf_counter() - t:.2f} s, CPU {children_cpu() - c:.2f} s"
                        f", same bytes: {slow == out}"
                    )
                print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--limit", type=int, default=100, help="page size of the timed searches")
    ap.add_argument("--measure-only", action="store_true")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--skip-search", action="store_true", help="only similar and cold start")
    ap.add_argument("--no-rank-cache", action="store_true", help="set the ranking cache aside")
    ap.add_argument("--dupes", action="store_true", help="also time `tagd dupes` (minutes)")
    ap.add_argument(
        "--dirty", type=int, default=0, help="files changed since the ranking cache's refresh"
    )
    ap.add_argument("--subset-of", type=Path, help="copy the first --files files of this index")
    ap.add_argument("--subset-embeddings", action="store_true", help="copy embeddings too")
    ap.add_argument(
        "--counts-only", action="store_true", help="only the bitmaps and `--count` timings"
    )
    ap.add_argument(
        "--sqlite-counts", action="store_true", help="also time SQLite's counts (unlimited output)"
    )
    ap.add_argument("--ann", action="store_true", help="only the HNSW index for similar")
    ap.add_argument("--queries", type=int, default=1000, help="--ann: recall over N files")
    ap.add_argument(
        "--noise-control", type=int, default=0, help="--ann: also recall on N noise vectors"
    )
    ap.add_argument(
        "--embeddings",
        choices=("structured", "noise"),
        default="structured",
        help="synthetic embeddings of a build: from the file's tags (default), or i.i.d. noise",
    )
    ap.add_argument(
        "--rewrite-embeddings",
        action="store_true",
        help="replace the embeddings of an existing bench database (--embeddings kind), in place",
    )
    ap.add_argument("--no-bitmaps", action="store_true", help="set the count bitmaps aside")
    ap.add_argument(
        "--unlimited", action="store_true", help="only unlimited `-0` output (whole process)"
    )
    ap.add_argument(
        "--patch", type=int, default=0, help="then time a bitmap patch of N changed files"
    )
    args = ap.parse_args(argv)
    if args.rewrite_embeddings:
        from bench.embeddings import rewrite

        rewrite(args.db, args.embeddings)
        return
    if args.subset_of is not None:
        subset(args.subset_of, args.db, args.files, args.subset_embeddings)
    elif not (args.measure_only or args.counts_only or args.ann or args.unlimited):
        build(args.db, args.files, args.dim, kind=args.embeddings)
    if args.ann:
        measure_ann(args.db, args.queries, args.patch, args.dupes, args.noise_control)
    elif args.unlimited:
        prepare_bitmaps(args.db, not args.no_bitmaps)
        measure_unlimited(args.db, args.repeats, args.sqlite_counts)
    elif args.counts_only:
        prepare_bitmaps(args.db, not args.no_bitmaps)
        measure_counts(args.db, args.repeats, args.sqlite_counts)
        if args.patch:
            measure_bitmap_patch(args.db, args.patch)
    elif not args.build_only:
        prepare_bitmaps(args.db, not args.no_bitmaps)
        prepare_rank_cache(args.db, not args.no_rank_cache, args.dirty)
        measure(args.db, args.repeats, args.limit, args.skip_search, args.dupes)
        if args.patch and not args.no_bitmaps:
            measure_bitmap_patch(args.db, args.patch)


if __name__ == "__main__":
    main()
