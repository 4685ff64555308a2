"""Does `web.pregenerate_thumbs` slow tagging? `tagd run` over the same gallery with it off
and on, alternating, timing how long the daemon takes to tag every image (and, with it on,
until every thumbnail exists), and the CPU time the thumbnail child used while the daemon
was still tagging: wall times swing with the machine's load, that figure does not.

    nice python -m bench.thumbs_ahead --images 200 --rounds 2

The model is bench.models' near-free tagger with the real ViT's I/O, so tagging is
decode-bound: the case where thumbnails (decodes too) compete hardest.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def _gallery(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 255, (75, 100, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((1600, 1200), Image.Resampling.BICUBIC)
        im.save(root / f"img{i:04}.jpg", quality=90)


def _count(db: Path, sql: str) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def _child_cpu_s(parent: int) -> float | None:
    """CPU seconds (user + system) the daemon's thumbnail child has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"tagd.web.pregen" in cmd and int(stat[1]) == parent:
            return (int(stat[11]) + int(stat[12])) / tick
    return None


def one_run(work: Path, gallery: Path, model: Path, n: int, ahead: bool, tag: str) -> dict:
    db = work / f"{tag}.db"
    thumbs = work / f"{tag}.thumbs"
    cfg = {
        "database": str(db),
        "watch": [{"path": str(gallery)}],
        "models": [{"name": "tiny", "path": str(model)}],
        "inference": {"device": "cpu"},
        "daemon": {"settle_seconds": 0.1},
        "web": {"port": 0, "thumbnail_dir": str(thumbs), "pregenerate_thumbs": ahead},
    }
    conf = work / f"{tag}.yaml"
    conf.write_text(yaml.safe_dump(cfg))
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tagd", "--config", str(conf), "run"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out: dict = {}
    try:
        while time.monotonic() - began < 1800:
            done = _count(db, "SELECT count(*) FROM taggings")
            if done >= n and "tagged_s" not in out:
                out["tagged_s"] = time.monotonic() - began
                if ahead:
                    out["child_cpu_while_tagging_s"] = _child_cpu_s(proc.pid)
            made = sum(1 for _ in thumbs.rglob("*.webp")) if ahead and thumbs.exists() else 0
            if ahead and made >= n:
                out["thumbs_s"] = time.monotonic() - began
                out["child_cpu_total_s"] = _child_cpu_s(proc.pid)
            if "tagged_s" in out and (not ahead or "thumbs_s" in out):
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    from bench.models import build_tiny_tagger, write_selected_tags

    with tempfile.TemporaryDirectory(prefix="tagd-thumbs-ahead-") as tmp:
        work = Path(tmp)
        model = work / "model"
        build_tiny_tagger(model / "model.onnx")
        write_selected_tags(model / "selected_tags.csv")
        gallery = work / "g"
        _gallery(gallery, args.images)
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(args.rounds):
            for ahead in (False, True):
                res = one_run(work, gallery, model, args.images, ahead, f"r{r}-{int(ahead)}")
                runs[ahead].append(res)
                print(f"round {r} pregenerate_thumbs={ahead}: {res}", flush=True)
        off = statistics.median(r["tagged_s"] for r in runs[False])
        on = statistics.median(r["tagged_s"] for r in runs[True])
        thumbs = statistics.median(r["thumbs_s"] for r in runs[True])
        during = [r["child_cpu_while_tagging_s"] for r in runs[True]]
        total = [r["child_cpu_total_s"] for r in runs[True]]
        print(
            f"the thumbnail child's CPU while the daemon tagged: {during} s; "
            f"by the last thumbnail: {total} s"
        )
        print(
            f"{args.images} images of 1.9 MP: all tagged in {off:.1f} s with it off, {on:.1f} s "
            f"with it on ({(on / off - 1) * 100:+.0f}%); every thumbnail made {thumbs:.1f} s "
            "after the start (medians)"
        )


if __name__ == "__main__":
    main()
