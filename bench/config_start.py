"""Cold start of `tagd search` and of loading the config, for two checkouts side by side.

    python -m bench.config_start OLD_CHECKOUT NEW_CHECKOUT [--runs 21]

Each run is a fresh `python -m tagd --config C search smile --limit 3` (and a fresh
`import tagd.config; load(C)`) with PYTHONPATH set to one checkout, interleaved so load on a
shared machine hits both alike. C is the shipped example config pointed at a 200-file index
built here. Reported: medians of wall time and of CPU (user+sys, what load disturbs least).
Bytecode is cached under the work folder, as an installed package has it.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_IMPORT_AND_LOAD = (
    "import time, yaml, dataclasses, pathlib, typing\n"
    "t = time.process_time(); import tagd.config as c; t1 = time.process_time()\n"
    "c.load({cfg!r}); print(t1 - t, time.process_time() - t1)"
)


def build(work: Path) -> Path:
    """A 200-file index and the example config pointed at it (web: on, as a full config)."""
    from tagd.index import db, models, paths, scores
    from tagd.tagging.labels import Labels

    labels = Labels(names=("general", "smile", "solo"), namespaces=("rating", "general", "general"))
    conn = db.connect(work / "tagd.db")
    with db.write(conn):
        model = models.register_model(
            conn,
            name="m1",
            family="wd14",
            source="bench",
            revision="r1",
            labels=labels,
            settings={},
        )
        for i in range(200):
            fid = paths.upsert_file(conn, f"{i:064x}", 10, 8, 8, "PNG")
            paths.upsert_path(conn, f"/srv/gallery/img_{i:04d}.png", fid, 10, 1)
            got = np.array([0.9, 0.9, 0.5 + (i % 5) / 10], dtype=np.float32)
            scores.save_prediction(
                conn, file_id=fid, model=model, scores=got, selected=got > 0.6, floor=0.05
            )
    conn.close()
    example = (Path(__file__).parent.parent / "tagd" / "config.example.yaml").read_text()
    text = example.replace("/var/lib/tagd/tagd.db", str(work / "tagd.db"))
    text = text.replace("# web:", "web:").replace("#   host:", "  host:")
    cfg = work / "config.yaml"
    cfg.write_text(text)
    return cfg


def _env(tree: str, work: Path) -> dict[str, str]:
    """Run from `work` (python puts the working folder before PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), PYTHONPYCACHEPREFIX=str(work / "pyc"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trees", nargs="+", help="checkouts (folders holding tagd/)")
    ap.add_argument("--runs", type=int, default=21)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = build(work)
        search = [sys.executable, "-m", "tagd", "--config", str(cfg), "search", "smile"]
        search += ["--limit", "3"]
        stats: dict[str, dict[str, list[float]]] = {
            t: {"wall": [], "cpu": [], "import": [], "load": []} for t in args.trees
        }
        for t in args.trees:  # warm the bytecode cache
            subprocess.run(
                search, env=_env(t, work), cwd=work, stdout=subprocess.DEVNULL, check=True
            )
        for _ in range(args.runs):
            for t in args.trees:
                env = _env(t, work)
                c0, w0 = _children_cpu(), time.perf_counter()
                subprocess.run(search, env=env, cwd=work, stdout=subprocess.DEVNULL, check=True)
                stats[t]["wall"].append(time.perf_counter() - w0)
                stats[t]["cpu"].append(_children_cpu() - c0)
                code = _IMPORT_AND_LOAD.format(cfg=str(cfg))
                out = subprocess.run(
                    [sys.executable, "-c", code], env=env, cwd=work, capture_output=True, text=True
                )
                imp, load = (float(x) for x in out.stdout.split())
                stats[t]["import"].append(imp)
                stats[t]["load"].append(load)
    print(f"load average {os.getloadavg()[0]:.1f}; medians of {args.runs} runs")
    for t, s in stats.items():
        ms = {k: statistics.median(v) * 1000 for k, v in s.items()}
        print(
            f"{t}: tagd search wall {ms['wall']:.0f} ms, cpu {ms['cpu']:.0f} ms; "
            f"import tagd.config {ms['import']:.1f} ms, load() {ms['load']:.1f} ms (cpu)"
        )


if __name__ == "__main__":
    main()
