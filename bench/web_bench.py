"""Server-side timings of the web UI on an index (read-only), thumbnail rate, server memory.

Grid JSON and HTML (page of 100), autocomplete, image page, file JSON and the result count,
through Starlette's TestClient against the app in this process (no network, no browser:
what the server spends). Thumbnails: WebP renders of 1-9 MP images from bench.corpus,
one thread and the server's pool. RSS of this process at the end = the server's memory.

    python -m bench.web_bench /work/benchdata/tagd-1m.db --repeats 10 --thumbs 24
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GRID_QUERIES = [
    "1girl", "1girl solo", "smile tag_0300", "long_hair -tag_0100", "tag_2000",
    "smile:<0.2 solo", "",
]  # fmt: skip
# Other orders of the grid ("" is the empty box: every image)
ORDERED = [("", "newest"), ("", "random"), ("1girl solo", "newest"), ("1girl solo", "random")]
PREFIXES = ["1", "lo", "s", "tag_01", "char", "bl"]


def rss_mib() -> tuple[float, float, float, float]:
    """(current, peak, anonymous, file-backed) resident memory of this process in MiB: the
    file-backed part is memory-mapped caches the kernel can drop and re-read."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()

    def mib(key: str) -> float:
        return int(fields.get(key, "0 kB").split()[0]) / 1024

    return mib("VmRSS"), mib("VmHWM"), mib("RssAnon"), mib("RssFile")


def timed(client: Any, url: str, params: dict | None, repeats: int) -> tuple[float, int]:
    """p50 in ms over `repeats` after one warm-up, and the status of the last answer."""
    r = client.get(url, params=params)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        r = client.get(url, params=params)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), r.status_code


def prepare_caches(db: Path, similar: bool) -> None:
    """Build the count bitmaps and the ranking cache (and with `similar` the similarity
    cache) beside `db` from a read-only connection, as the daemon keeps them; the index
    itself is not written."""
    from tagd.index.db import connect
    from tagd.search import bitmaps, rankcache

    conn = connect(db, readonly=True)
    try:
        t = time.perf_counter()
        print(f"bitmaps: {bitmaps.refresh(conn, db)} in {time.perf_counter() - t:.0f} s")
        if rankcache.RankCache.open(db) is None:
            t = time.perf_counter()
            cache = rankcache.build(conn, db)
            print(f"ranking cache built in {time.perf_counter() - t:.0f} s, {len(cache.rows)} tags")
        if similar:
            from tagd.search.similar import EmbeddingIndex

            t = time.perf_counter()
            EmbeddingIndex.open(conn, str(db), None)
            print(f"similarity cache ready in {time.perf_counter() - t:.0f} s")
    finally:
        conn.close()


def measure(db: Path, repeats: int, similar: bool) -> None:
    from starlette.testclient import TestClient

    from tagd.config import WebConfig, parse
    from tagd.web.app import create_app

    thumbs = tempfile.mkdtemp(prefix="tagd-web-bench-")
    config = parse({"database": str(db)}, base=db.parent)
    web = WebConfig(thumbnail_dir=Path(thumbs))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    n_files = conn.execute("SELECT max(id) FROM files").fetchone()[0]
    rng = random.Random(0)
    shas = [
        conn.execute(
            "SELECT sha256 FROM files WHERE id = ?", (rng.randint(1, n_files),)
        ).fetchone()[0]
        for _ in range(repeats + 1)
    ]
    conn.close()
    t = time.perf_counter()
    app = create_app(config, web, migrate=False)
    print(f"index: {db} ({n_files:,} files); app ready in {time.perf_counter() - t:.2f} s")
    state = app.state.tagd
    with TestClient(app) as client:
        print(f"\n{'request':<44} {'p50 ms':>8}  status")
        for prefix in PREFIXES[:3]:
            ms, status = timed(client, "/api/tags", {"prefix": prefix, "limit": 15}, repeats)
            print(f"{'autocomplete (counting, no cache) ' + repr(prefix):<44} {ms:8.1f}  {status}")
        t = time.perf_counter()
        while not state.counts.ready and time.perf_counter() - t < 900:
            time.sleep(0.2)
        print(f"{'tag counts ready after':<44} {time.perf_counter() - t:8.1f} s")
        for prefix in PREFIXES:
            ms, status = timed(client, "/api/tags", {"prefix": prefix, "limit": 15}, repeats)
            print(f"{'autocomplete ' + repr(prefix):<44} {ms:8.1f}  {status}")
        for q, sort in [(q, "score") for q in GRID_QUERIES] + ORDERED:
            params: dict = {"q": q, "limit": 100, "sort": sort}
            if sort == "random":
                params["seed"] = 7  # the grid keeps one seed per query: pages of one order
            label = repr(q) + ("" if sort == "score" else f" {sort}")
            ms, status = timed(client, "/api/search", params, repeats)
            print(f"{'grid JSON ' + label:<44} {ms:8.1f}  {status}")
            ms, status = timed(client, "/", {"q": q, "sort": sort}, repeats)
            print(f"{'grid HTML ' + label:<44} {ms:8.1f}  {status}")
        for q in GRID_QUERIES[:2]:
            ms, status = timed(client, "/api/count", {"q": q}, max(1, repeats // 3))
            print(f"{'exact count (asynchronous) ' + repr(q):<44} {ms:8.1f}  {status}")
        for name, url in (("image page", "/image/{}"), ("file JSON", "/api/files/{}")):
            times = []
            for sha in shas:
                t = time.perf_counter()
                r = client.get(url.format(sha))
                times.append((time.perf_counter() - t) * 1000)
            p50 = statistics.median(times[1:])
            print(f"{name + ' (random files)':<44} {p50:8.1f}  {r.status_code}")
        if similar:
            times = []
            for sha in shas:
                t = time.perf_counter()
                r = client.get(f"/api/similar/{sha}", params={"limit": 12})
                times.append((time.perf_counter() - t) * 1000)
            print(
                f"{'similar strip /api/similar (first: load)':<44} {times[0]:8.1f}  {r.status_code}"
            )
            print(f"{'similar strip /api/similar':<44} {statistics.median(times[1:]):8.1f}")
            # What a browser waits for: the page, then the strip its script asks for.
            times = []
            for sha in shas[1:]:
                t = time.perf_counter()
                page = client.get(f"/image/{sha}")
                strip = client.get(f"/api/similar/{sha}", params={"limit": 12})
                times.append((time.perf_counter() - t) * 1000)
            both = f"{page.status_code}/{strip.status_code}"
            label = "image page + its similar strip"
            print(f"{label:<44} {statistics.median(times):8.1f}  {both}")
    now, peak, anon, mapped = rss_mib()
    print(
        f"\nserver process RSS: {now:.0f} MiB now ({anon:.0f} MiB anonymous, {mapped:.0f} MiB "
        f"file-backed: mapped caches), {peak:.0f} MiB peak"
    )


def thumbnails(n: int, workers: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from bench.corpus import build_corpus
    from tagd.web.thumbs import render

    with tempfile.TemporaryDirectory(prefix="tagd-thumb-corpus-") as tmp:
        paths = build_corpus(tmp, n, jobs=2)
        mp = statistics.mean(_pixels(p) for p in paths) / 1e6
        t = time.perf_counter()
        sizes = [len(render(str(p), 256, 200_000_000)) for p in paths]
        one = n / (time.perf_counter() - t)
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda p: render(str(p), 256, 200_000_000), paths))
        many = n / (time.perf_counter() - t)
    print(
        f"thumbnails (256 px WebP) of {n} images, mean {mp:.1f} MP: {one:.1f} img/s on one "
        f"thread, {many:.1f} img/s with {workers} threads ({os.cpu_count()} CPUs); "
        f"thumbnail files {statistics.mean(sizes) / 1024:.1f} KiB on average "
        f"({min(sizes) / 1024:.1f}-{max(sizes) / 1024:.1f})"
    )


def _pixels(p: Path) -> int:
    from PIL import Image

    with Image.open(p) as im:
        return im.size[0] * im.size[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, nargs="?")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--thumbs", type=int, default=0, help="images for the thumbnail rate")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--similar", action="store_true", help="also time /api/similar")
    ap.add_argument(
        "--prepare-caches",
        action="store_true",
        help="build the ranking (and with --similar the similarity) cache beside DB first",
    )
    args = ap.parse_args(argv)
    if args.db is None and not args.thumbs:
        ap.error("give an index (DB) and/or --thumbs N")
    if args.db is not None:
        if args.prepare_caches:
            prepare_caches(args.db, args.similar)
        measure(args.db, args.repeats, args.similar)
    if args.thumbs:
        thumbnails(args.thumbs, args.workers)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
