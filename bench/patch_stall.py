"""Do queries stall while the HNSW index is patched beside them?

    python -m bench.patch_stall /work/benchdata/tagd-1m.db [--changed 6000]

Runs one patch of `--changed` random files in a thread at nice 19, first in this process
(`ann.patch`) and then in a process of its own (`ann.apart`, as the daemon does), while this
thread asks `similar.nearest_files` every 0.2 s as a query socket or the web UI would. Prints
the patch's duration and the slowest queries. Rewrites the index file (same content).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np


def probe(db: Path, run: Any) -> None:
    from tagd.index.db import connect
    from tagd.search import similar
    from tagd.service.daemon import idle_priority

    conn = connect(db, readonly=True)
    similar.nearest_files(conn, db, None, 12345, limit=20)  # the view open, as a daemon has it
    t0 = time.monotonic()
    took: list[float] = []
    patcher = threading.Thread(target=lambda: idle_priority(run))
    patcher.start()
    while patcher.is_alive():
        t = time.monotonic()
        similar.nearest_files(conn, db, None, 12345, limit=20)
        took.append(time.monotonic() - t)
        time.sleep(0.2)
    patcher.join()
    conn.close()
    worst = sorted(took, reverse=True)[:3]
    print(
        f"  patch {time.monotonic() - t0:.1f} s; {len(took)} queries beside it: median "
        f"{statistics.median(took) * 1000:.1f} ms, slowest "
        f"{', '.join(f'{w * 1000:.0f}' for w in worst)} ms"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--changed", type=int, default=6000)
    args = ap.parse_args(argv)

    from tagd.index import sidecache
    from tagd.index.db import connect
    from tagd.search import ann

    conn = connect(args.db, readonly=True)
    meta = sidecache.read_meta(args.db, ann.kind(1), ann.FORMAT)
    assert meta is not None, "no HNSW index beside this database: run bench.search_bench --ann"
    top = int(conn.execute("SELECT max(file_id) FROM embeddings").fetchone()[0])
    dirty = np.random.default_rng(9).choice(np.arange(1, top + 1), args.changed, replace=False)
    print(f"in this process: ann.patch of {args.changed:,} files")
    probe(args.db, lambda: ann.patch(conn, args.db, 1, meta, dirty=dirty.tolist()))
    print("in a process of its own: ann.apart('patch') (the files changed since the index)")
    probe(args.db, lambda: ann.apart("patch", args.db, 1))
    conn.close()


if __name__ == "__main__":
    main()
