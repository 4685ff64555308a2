"""Model start: a plain ONNX Runtime session against `tagd tag` and `tagd scan`, cold and warm.

    python -m bench.model_start [--workdir /tmp/tagd-bench] [--runs 3] [--images 20]

Every figure is a whole process measured from outside (spawn to first result line, spawn to
exit), so interpreter start and imports count on both sides. Runs are interleaved and the
median is printed, with the load average, because a shared machine's load moves between runs:
compare figures of one invocation only.

- plain: `import onnxruntime`, `InferenceSession(model.onnx)`, one 448x448 image; with ORT's
  default options and with tagd's (thread count, no spinning), since those differ under load.
- tag cold / warm: `tagd tag one.jpg --model FOLDER --cpu` with an empty model start cache /
  with the cache the cold run left.
- scan cold / warm: `tagd scan` of an `--images` gallery into a fresh database, whole process.
- limit: a bare ONNX Runtime session (its own process, no tagd code) running ready tensors at
  the scan's batch size, `--images` images after one warm-up batch; measured in every round
  next to the scan it is compared with, with ORT's default options and with tagd's, and the
  faster of the two is the limit (the stricter comparison).

It ends with the ratios of issue #17: scan img/s / limit (target >= 0.9), and warm `tagd
tag` and warm `tagd scan` first result / plain load + first run (target <= 1.3; the scan's
first result is its first stored tagging, polled from the database), per round and as
medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.throughput import corpus, log, model_dir

PLAIN = """
import sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
so = ort.SessionOptions()
if sys.argv[2] == "tagd":
    from tagd.tagging import sizing
    from tagd.config import InferenceConfig
    from tagd.tagging.session import session_options
    plan = sizing.plan(InferenceConfig("cpu"), gpu=False, cores=sizing.available_cores())
    so = session_options(plan.ort_threads)
t1 = time.perf_counter()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
x = np.random.default_rng(0).uniform(0, 255, (1, 448, 448, 3)).astype(np.float32)
s.run(None, {s.get_inputs()[0].name: x})
t3 = time.perf_counter()
print(f"import {t1 - t0:.2f} s, load {t2 - t1:.2f} s, run {t3 - t2:.2f} s", flush=True)
"""


LIMIT = """
import sys, time
import numpy as np, onnxruntime as ort
path, options, batch, images = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
so = ort.SessionOptions()
if options == "tagd":
    from tagd.tagging import sizing
    from tagd.config import InferenceConfig
    from tagd.tagging.session import session_options
    plan = sizing.plan(InferenceConfig("cpu"), gpu=False, cores=sizing.available_cores())
    so = session_options(plan.ort_threads)
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).uniform(0, 255, (batch, 448, 448, 3)).astype(np.float32)
feed = {s.get_inputs()[0].name: x}
s.run(None, feed)
runs = -(-images // batch)
t0 = time.perf_counter()
for _ in range(runs):
    s.run(None, feed)
print(f"{runs * batch / (time.perf_counter() - t0):.4f}", flush=True)
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(seconds to the first stdout line, seconds to exit, that line)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.perf_counter() - start
    _, err = proc.communicate(timeout=600)
    t_exit = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {err.strip()[-500:]}")
    return t_first, t_exit, first.strip()


def timed_scan(cmd: list[str], env: dict[str, str], db: Path) -> tuple[float, float]:
    """(seconds to the first stored result: a `taggings` row, polled every 10 ms from a
    read-only connection; seconds to exit) of a `tagd scan` into the fresh database `db`."""
    import sqlite3

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    t_first = float("nan")
    while proc.poll() is None:
        if t_first != t_first and db.exists():  # NaN: not seen yet
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
                try:
                    if conn.execute("SELECT 1 FROM taggings LIMIT 1").fetchone():
                        t_first = time.perf_counter() - start
                finally:
                    conn.close()
            except sqlite3.Error:
                pass  # not created yet, or busy
        time.sleep(0.01)
    t_exit = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr is not None else ""
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{cmd[:4]} exited {proc.returncode}: {err.strip()[-500:]}")
    return t_first, t_exit


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tagd-bench"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    folder = model_dir(args.workdir, "vit")
    images = corpus(args.workdir, args.images)
    cache = args.workdir / "model-start-cache"
    py = sys.executable
    base_env = {**os.environ, "TAGD_MODEL_CACHE": str(cache), "PYTHONPATH": os.getcwd()}
    one = str(images[0])
    tag_cmd = [py, "-m", "tagd", "tag", one, "--model", str(folder), "--cpu"]
    gallery = args.workdir / f"corpus-{args.images}"
    config = args.workdir / "model-start.yaml"
    db_path = args.workdir / "model-start.db"
    config.write_text(
        json.dumps(
            {
                "database": str(db_path),
                "watch": [str(gallery)],
                "models": [{"name": "vit", "path": str(folder)}],
                "inference": {"device": "cpu"},
            }
        )
    )
    scan_cmd = [py, "-m", "tagd", "--config", str(config), "scan"]

    def fresh_db() -> None:
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)

    fig: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        fig.setdefault(name, []).append(value)

    from tagd.config import InferenceConfig
    from tagd.tagging import sizing

    plan = sizing.plan(InferenceConfig("cpu"), gpu=False, cores=sizing.available_cores())
    batch_size = plan.batch_size

    def limit_round() -> float:
        """The faster bare session (ORT's options or tagd's) on the scan's batch, img/s."""
        rates = []
        for options in ("default", "tagd"):
            cmd = [py, "-c", LIMIT, str(folder / "model.onnx"), options]
            _, _, line = timed([*cmd, str(batch_size), str(args.images)], base_env)
            rates.append(float(line))
            add(f"limit_{options}", rates[-1])
        return max(rates)

    log(f"load average before: {loadavg()}")
    shutil.rmtree(cache, ignore_errors=True)
    t_first, t_exit, line = timed(tag_cmd, base_env)
    add("tag_cold_first", t_first)
    log(f"tag cold: first result {t_first:.2f} s, exit {t_exit:.2f} s")
    shutil.rmtree(cache, ignore_errors=True)
    fresh_db()
    _, t_exit, _ = timed(scan_cmd, base_env)
    add("scan_cold_exit", t_exit)
    log(f"scan cold ({args.images} images): {t_exit:.2f} s")
    scan_ratios: list[float] = []
    tag_ratios: list[float] = []
    scan_first_ratios: list[float] = []
    for r in range(args.runs):
        load = loadavg()
        plain_first = []
        for options in ("default", "tagd"):
            plain = [py, "-c", PLAIN, str(folder / "model.onnx"), options]
            t_first, _, line = timed(plain, base_env)
            add(f"plain_{options}_first", t_first)
            plain_first.append(t_first)
            log(f"plain ({options} options): {t_first:.2f} s to first result ({line})")
        t_first, t_exit, _ = timed(tag_cmd, base_env)
        add("tag_warm_first", t_first)
        tag_ratios.append(t_first / min(plain_first))
        log(f"tag warm: first result {t_first:.2f} s, exit {t_exit:.2f} s")
        fresh_db()
        t_first, t_exit = timed_scan(scan_cmd, base_env, db_path)
        add("scan_warm_first", t_first)
        add("scan_warm_exit", t_exit)
        scan_first_ratios.append(t_first / min(plain_first))
        limit = limit_round()
        add("limit", limit)
        scan_ratios.append(args.images / t_exit / limit)
        log(
            f"round {r + 1}: scan warm ({args.images} images) {t_exit:.2f} s = "
            f"{args.images / t_exit:.3f} img/s; limit {limit:.3f} img/s (bare session, batch "
            f"{batch_size}) -> {scan_ratios[-1]:.2f}; tag warm / plain {tag_ratios[-1]:.2f}; "
            f"scan first result {t_first:.2f} s / plain {scan_first_ratios[-1]:.2f}; "
            f"load {load} -> {loadavg()}"
        )

    med = {k: statistics.median(v) for k, v in fig.items()}
    print(f"load average after: {loadavg()}")
    for k in sorted(med):
        unit = "img/s" if k.startswith("limit") else "s"
        print(f"{k:24s} {med[k]:6.2f} {unit:5s} (runs: {', '.join(f'{v:.2f}' for v in fig[k])})")
    print(
        f"scan warm / limit: {statistics.median(scan_ratios):.2f} (target >= 0.9; rounds: "
        f"{', '.join(f'{v:.2f}' for v in scan_ratios)})"
    )
    print(
        f"tag warm first result / plain load + first run: {statistics.median(tag_ratios):.2f}x "
        f"(target <= 1.3x; rounds: {', '.join(f'{v:.2f}' for v in tag_ratios)})"
    )
    print(
        f"scan warm first result / plain load + first run: "
        f"{statistics.median(scan_first_ratios):.2f}x (target <= 1.3x; rounds: "
        f"{', '.join(f'{v:.2f}' for v in scan_first_ratios)})"
    )
    cold = args.images / med["scan_cold_exit"] / med["limit"]
    print(f"scan cold / limit: {cold:.2f} (one run, against the median limit)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"median": med, "runs": fig, "scan_ratios": scan_ratios, "tag_ratios": tag_ratios},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
