"""Time `tagd reindex` on a synthetic index shaped like WD v3 (10,861 tags, 1024-d embeddings).

    python -m bench.reindex --files 20000

Builds a fresh SQLite index (about 30 stored scores per file, one float16 embedding per file),
then times a threshold raise (stored scores only) and a threshold drop below the stored floor
(embeddings x head), and extrapolates both linearly to 1M files.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from tagd.config import TagRules
from tagd.index import db, models
from tagd.tagging import reindex, results
from tagd.tagging.graph import Head
from tagd.tagging.labels import Labels

N_TAGS, N_RATING, N_GENERAL, DIM = 10861, 4, 8106, 1024


def build(path: Path, n_files: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    conn = db.connect(path)
    namespaces = ["rating"] * N_RATING + ["general"] * N_GENERAL
    namespaces += ["character"] * (N_TAGS - len(namespaces))
    labels = Labels(tuple(f"tag{i}" for i in range(N_TAGS)), tuple(namespaces))
    with db.write(conn):
        record = models.register_model(
            conn,
            name="bench",
            family="wd14",
            source="bench",
            revision="r",
            labels=labels,
            settings={},
        )
        w = rng.normal(0, 0.05, (DIM, N_TAGS)).astype(np.float32)
        b = np.full(N_TAGS, -8.0, np.float32)
        results.save_head(conn, record, Head("", w, b, True))
    now = time.time()
    step = 5000
    for start in range(0, n_files, step):
        ids = range(start + 1, min(n_files, start + step) + 1)
        with db.write(conn):
            conn.executemany(
                "INSERT INTO files(id, sha256, size, first_seen) VALUES (?, ?, 1, ?)",
                [(i, f"{i:064x}", now) for i in ids],
            )
            conn.executemany(
                "INSERT INTO taggings(file_id, model_id, revision, floor, tagged_at) "
                "VALUES (?, ?, 'r', 0.05, ?)",
                [(i, record.id, now) for i in ids],
            )
            rows = []
            for i in ids:
                cols = np.concatenate(
                    [[int(rng.integers(0, N_RATING))], rng.choice(N_TAGS - 4, 29) + 4]
                )
                for c in np.unique(cols):
                    s = float(rng.uniform(0.05, 1.0))
                    rows.append((i, record.id, int(record.tag_ids[c]), s, int(s >= 0.35)))
            conn.executemany(
                "INSERT INTO scores(file_id, model_id, tag_id, score, selected) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
            emb = rng.normal(0, 1, (len(ids), DIM)).astype("<f2")
            conn.executemany(
                "INSERT INTO embeddings(file_id, model_id, dim, dtype, vector) "
                "VALUES (?, ?, ?, 'float16', ?)",
                [(i, record.id, DIM, emb[k].tobytes()) for k, i in enumerate(ids)],
            )
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=20000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        t0 = time.perf_counter()
        build(path, args.files)
        print(f"built {args.files} files in {time.perf_counter() - t0:.1f} s")
        conn = db.connect(path)
        for label, general in (
            ("raise to 0.5 (stored scores)", 0.5),
            ("drop to 0.02 (embeddings x head)", 0.02),
        ):
            rules: dict[str, float | str] = {"general": general, "character": 0.85, "rating": "top"}
            rep = reindex.reindex_model(
                conn, name="bench", thresholds=rules, tag_rules=TagRules(), floor=0.05
            )
            per_m = rep.seconds / args.files * 1_000_000
            print(
                f"{label}: {rep.files} files in {rep.seconds:.1f} s "
                f"({rep.files / rep.seconds:.0f} files/s; 1M files ≈ {per_m / 60:.0f} min); "
                f"{rep.from_scores} from scores, {rep.from_embeddings} from embeddings"
            )


if __name__ == "__main__":
    main()
