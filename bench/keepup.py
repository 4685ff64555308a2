"""Do the caches beside the database keep up with a daemon tagging at N images a second?

    python -m bench.keepup /work/benchdata/tagd-1m.db --rate 200 --seconds 180

A writer re-stores `--rate` files a second, as the pipeline's store does for newly tagged
files: their scores, tagging row and embedding rewritten (with the values they had, so the
bench index's answers do not change) in one transaction per second, each change logged by
the schema's triggers. Meanwhile the daemon's own cache jobs run on its schedule, in threads
as in `tagd run`: the ranking cache and the bitmaps (`Daemon._rank_cache`) and the HNSW index
(`Daemon._similar_index`, at nice 19), every `--interval` seconds. Every second it samples how
far each cache's seq is behind the database's, in changed files and in seconds since the
writer reached the cache's seq. It prints each job's runs and the worst lag of each cache;
"keeps up" means the lag stays within about two intervals plus one run of the job.

Writes to the database (the same values back) and patches its caches; results stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any


def _seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM score_changes").fetchone()[0])


def _files_since(conn: sqlite3.Connection, seq: int) -> int:
    """Files changed after `seq` (the log keeps one row per file: its latest change)."""
    return int(
        conn.execute("SELECT count(*) FROM score_changes WHERE seq > ?", (seq,)).fetchone()[0]
    )


def _meta_seq(db: Path, kind: str) -> int | None:
    try:
        meta = json.loads(Path(f"{db}.{kind}.json").read_text())
    except (OSError, ValueError):
        return None
    return max(int(meta.get("seq", 0)), int(meta.get("journal_seq", 0)))


def writer(db: Path, rate: int, stop: threading.Event, reached: list[tuple[float, int]]) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    ids = [r[0] for r in conn.execute("SELECT file_id FROM taggings ORDER BY file_id")]
    at = len(ids) // 3
    while not stop.is_set():
        tick = time.monotonic()
        batch = ids[at : at + rate]
        at = (at + rate) % max(1, len(ids) - rate)
        keys = json.dumps(batch)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE scores SET score = score WHERE file_id IN (SELECT value FROM json_each(?))",
            (keys,),
        )
        conn.execute(
            "UPDATE taggings SET tagged_at = tagged_at "
            "WHERE file_id IN (SELECT value FROM json_each(?))",
            (keys,),
        )
        conn.execute(
            "UPDATE embeddings SET vector = vector "
            "WHERE file_id IN (SELECT value FROM json_each(?))",
            (keys,),
        )
        conn.execute("COMMIT")
        reached.append((time.monotonic(), _seq(conn)))
        stop.wait(max(0.0, 1.0 - (time.monotonic() - tick)))
    conn.close()


def asker(db: Path, every: float, stop: threading.Event, server: Any, out: list[Any]) -> None:
    """`tagd similar` as a whole process every `every` seconds, as a user at a shell would
    run it beside the daemon: (seconds, answered by the daemon's socket)."""
    import subprocess
    import sys
    import tempfile

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    shas = [r[0] for r in conn.execute("SELECT sha256 FROM files ORDER BY id LIMIT 50")]
    conn.close()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(f"database: {db}\nwatch: [{tmp}]\nmodels:\n  - name: m\n    path: {tmp}\n")
        i = 0
        while not stop.wait(every):
            before = server.answered
            cmd = [sys.executable, "-m", "tagd", "--config", str(cfg), "similar", shas[i % 50]]
            t = time.monotonic()
            subprocess.run(cmd, capture_output=True, timeout=120)
            out.append((time.monotonic() - t, server.answered > before))
            i += 1


def job(name: str, run: Any, interval: float, stop: threading.Event, log: list[Any]) -> None:
    while not stop.wait(interval):
        t = time.monotonic()
        run()
        log.append((name, time.monotonic() - t))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--rate", type=int, default=200, help="files re-stored a second")
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--interval", type=float, default=10.0, help="daemon.rank_cache_interval")
    ap.add_argument(
        "--similar-every",
        type=float,
        default=0.0,
        help="also run `tagd similar` every N seconds against a query socket held here",
    )
    args = ap.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
    logging.getLogger("tagd.service.daemon").setLevel(logging.DEBUG)  # every job's outcome
    from tagd.service.daemon import Daemon

    fake: Any = SimpleNamespace(config=SimpleNamespace(database=args.db))
    stop = threading.Event()
    reached: list[tuple[float, int]] = []
    runs: list[tuple[str, float]] = []
    threads = [
        threading.Thread(target=writer, args=(args.db, args.rate, stop, reached)),
        threading.Thread(
            target=job,
            args=("rank+bitmaps", lambda: Daemon._rank_cache(fake), args.interval, stop, runs),
        ),
        threading.Thread(
            target=job,
            args=("similar", lambda: Daemon._similar_index(fake), args.interval, stop, runs),
        ),
    ]
    asked: list[tuple[float, bool]] = []
    server = None
    if args.similar_every:
        from tagd.service.queries import QueryServer

        server = QueryServer(args.db)  # as the daemon holds it
        server.start()
        threads.append(
            threading.Thread(target=asker, args=(args.db, args.similar_every, stop, server, asked))
        )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    start_seq = _seq(conn)
    for t in threads:
        t.start()
    lags: dict[str, list[tuple[int, float]]] = {"rank": [], "bitmaps": [], "ann-1": []}
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.seconds:
        time.sleep(1.0)
        now = time.monotonic()
        for kind in lags:
            got = _meta_seq(args.db, kind)
            if got is None:
                continue
            behind_since = next((t for t, s in reached if s > got), now)
            lags[kind].append((_files_since(conn, got), now - behind_since))
    stop.set()
    for t in threads:
        t.join()
    conn.close()
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True)
    written = _files_since(conn, start_seq)
    conn.close()
    print(
        f"written: {written:,} files re-stored in {args.seconds:.0f} s "
        f"({written / args.seconds:.0f} files/s asked {args.rate}); load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for name in ("rank+bitmaps", "similar"):
        took = [d for n, d in runs if n == name]
        if took:
            print(
                f"job {name}: {len(took)} runs, median {statistics.median(took):.2f} s, "
                f"max {max(took):.2f} s"
            )
    if server is not None:
        server.stop()
    if asked:
        by_socket = [t for t, ok in asked if ok]
        itself = [t for t, ok in asked if not ok]
        line = (
            f"`tagd similar` beside it: {len(asked)} runs, {len(by_socket)} answered by the socket"
        )
        if by_socket:
            line += (
                f" (median {statistics.median(by_socket) * 1000:.0f} ms, "
                f"max {max(by_socket) * 1000:.0f} ms)"
            )
        if itself:
            line += (
                f"; {len(itself)} answered by the command itself (median "
                f"{statistics.median(itself) * 1000:.0f} ms, max {max(itself) * 1000:.0f} ms)"
            )
        print(line)
    for kind, seen in lags.items():
        if seen:
            files = [f for f, _ in seen]
            secs = [s for _, s in seen]
            print(
                f"cache {kind}: behind by median {statistics.median(files):,.0f} files / "
                f"{statistics.median(secs):.1f} s, at worst {max(files):,} files / "
                f"{max(secs):.1f} s; at the end {seen[-1][0]:,} files"
            )


if __name__ == "__main__":
    main()
