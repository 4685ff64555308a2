"""What tagging through a Ray cluster costs next to the local pipeline, on one machine.

For the decode-bound tiny model and the compute-bound ViT-B/16 (bench/models.py) over the
same corpus (bench/corpus.py), in one run:

- local: `Pipeline.run()` img/s (decode workers + ONNX Runtime in this process);
- cluster: `ClusterPipeline.run()` img/s on a local Ray cluster with tagd's default workers
  (one 1-CPU actor per core), the actors started and their models loaded beforehand;
- the ratio, the per-image overhead (1/cluster - 1/local, ms), the bytes shipped per image
  and the coordinator's own CPU per image (what the NAS pays);
- with `--two-node`: a head and a second node started with `ray start` on this machine
  (loopback), one 1-CPU worker on each, and the files each node tagged.

It ends with a projection (not a measurement) of a NAS + 1 and + 3 GPU boxes on 1 GbE and
10 GbE from the measured bytes and coordinator CPU per image and a GPU rate you give.

    nice python -m bench.cluster_bench --workdir /tmp/tagd-bench --two-node
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.throughput import corpus, log, measure_tagd, model_dir, open_tagger, pipeline_config
from tagd.config import ClusterConfig, InferenceConfig
from tagd.index import db
from tagd.ingest import scanner
from tagd.tagging import sizing, tagger

GBE1 = 117e6  # usable bytes/s of 1 GbE after TCP/IP overhead
GBE10 = 1170e6


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_cluster(
    workdir: Path,
    gallery: Path,
    model: Path,
    inference: InferenceConfig,
    cluster: ClusterConfig,
) -> dict[str, Any]:
    """img/s of ClusterPipeline.run() over a freshly queued gallery, workers already loaded."""
    from tagd.cluster.coordinator import ClusterPipeline

    config = replace(pipeline_config(workdir, gallery, model, inference), cluster=cluster)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{config.database}{suffix}").unlink(missing_ok=True)
    conn = db.connect(config.database)
    queued = scanner.scan(conn, config).queued
    pipeline = ClusterPipeline(conn, config, tagger.load_all(config))
    pipeline.start()
    cpu0, start = cpu_s(), time.perf_counter()
    outcome = pipeline.run()
    elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
    workers = pipeline.workers()
    nodes: dict[str, int] = {}
    for a, w in zip(pipeline.actors, workers, strict=True):
        node = str(a.info.get("node_id", "?"))[:8]
        nodes[node] = nodes.get(node, 0) + int(w["done"])
    shipped, files = pipeline.bytes_shipped, pipeline.files_shipped
    pipeline.close()
    conn.close()
    if outcome.done != queued:
        raise RuntimeError(f"cluster tagged {outcome.done} of {queued}: {outcome.errors[:3]}")
    return {
        "rate": queued / elapsed,
        "bytes_per_image": shipped / max(1, files),
        "coordinator_cpu_ms": 1000 * cpu / queued,
        "workers": len(workers),
        "nodes": nodes,
    }


def two_node(workdir: Path, gallery: Path, model: Path, inference: InferenceConfig) -> dict:
    """`ray start --head` and `ray start --address` on this machine, one worker per node."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_memory_monitor_refresh_ms": "0"}
    port = 6390
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats"]
    head = [ray_bin, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    subprocess.run(head, check=True, env=env, capture_output=True, timeout=180)
    try:
        worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", *common]
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=180)
        from tagd.cluster import ray_backend as rb

        rb.connect(f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while rb.cluster_cpus() < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        nodes = len([n for n in rb.ray.nodes() if n.get("Alive")])
        cluster = ClusterConfig(address=f"127.0.0.1:{port}", actors=2, num_cpus=1.0)
        result = measure_cluster(workdir, gallery, model, inference, cluster)
        result["ray_nodes"] = nodes
        rb.shutdown()
        return result
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)


def project(bytes_per_image: float, coord_ms: float, gpu_rate: float) -> list[str]:
    """min(GPUs, link, coordinator CPU): each box decodes and infers at `gpu_rate`."""
    coord = 1000.0 / coord_ms if coord_ms > 0 else float("inf")
    lines = []
    for boxes in (1, 3):
        for name, link in (("1 GbE", GBE1), ("10 GbE", GBE10)):
            wire = link / bytes_per_image
            rate = min(boxes * gpu_rate, wire, coord)
            bound = {boxes * gpu_rate: "GPUs", wire: "link", coord: "coordinator CPU"}[rate]
            lines.append(
                f"  NAS + {boxes} GPU box{'es' if boxes > 1 else ''}, {name:6}: "
                f"{rate:8.0f} img/s  (GPUs {boxes * gpu_rate:.0f}, link {wire:.0f}, "
                f"coordinator {coord:.0f}; bound: {bound})"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster_bench", description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tagd-bench"))
    ap.add_argument("--tiny-images", type=int, default=48)
    ap.add_argument("--vit-images", type=int, default=8)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--two-node", action="store_true", help="also the loopback two-node run")
    ap.add_argument(
        "--gpu-rate",
        type=float,
        default=300.0,
        help="img/s one GPU box reaches on its own, for the projection (an input, not measured)",
    )
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    cores = sizing.available_cores()
    inference = InferenceConfig(device="cpu")
    plan = sizing.plan(inference, gpu=False, cores=cores)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {cores} cores, load average {load} (shared: other jobs were running)")
    print(
        f"local: {plan.decode_workers} decode workers, {plan.ort_threads} ORT threads, batch "
        f"{plan.batch_size}; cluster: {cores} workers x 1 CPU, batch {plan.batch_size}"
    )
    from tagd.cluster import ray_backend as rb

    cases = [("tiny", args.tiny_images)] + ([] if args.skip_vit else [("vit", args.vit_images)])
    results: dict[str, dict[str, Any]] = {}
    for name, n in cases:
        paths = corpus(workdir, n)
        folder = model_dir(workdir, name)
        gallery = paths[0].parent
        bound = "decode-bound (tiny model)" if name == "tiny" else "compute-bound (ViT-B/16 448)"
        log(f"{bound}: {n} images, local pipeline")
        local, _ = measure_tagd(
            workdir, gallery, folder, inference, open_tagger(folder, inference, plan.ort_threads)
        )
        log(f"{bound}: {n} images, local Ray cluster")
        rb.connect("local", object_store_bytes=256 * 1024 * 1024)
        remote = measure_cluster(workdir, gallery, folder, inference, ClusterConfig())
        rb.shutdown()
        results[name] = remote
        overhead = 1000.0 * (1.0 / remote["rate"] - 1.0 / local)
        print(f"\n{bound}, {n} images")
        print(f"  local pipeline        {local:8.2f} img/s")
        print(
            f"  cluster ({remote['workers']} workers)   {remote['rate']:8.2f} img/s"
            f"  = {remote['rate'] / local:.2f} x local"
        )
        print(f"  overhead per image    {overhead:8.1f} ms")
        print(f"  bytes shipped         {remote['bytes_per_image'] / 1e6:8.2f} MB/image")
        print(f"  coordinator CPU       {remote['coordinator_cpu_ms']:8.1f} ms/image")
    if args.two_node:
        name, n = cases[0]
        paths = corpus(workdir, n)
        folder = model_dir(workdir, name)
        log("two nodes on loopback (ray start --head + ray start --address)")
        two = two_node(workdir, paths[0].parent, folder, inference)
        split = ", ".join(f"node {k}: {v} files" for k, v in sorted(two["nodes"].items()))
        print(f"\ntwo nodes (loopback), {name} model, {n} images, 1 worker x 1 CPU per node")
        print(f"  Ray nodes alive       {two['ray_nodes']}")
        print(f"  cluster               {two['rate']:8.2f} img/s")
        print(f"  split                 {split}")
    ref = results.get("vit") or results[cases[0][0]]
    print(
        f"\nprojection (not measured): each GPU box alone at {args.gpu_rate:.0f} img/s "
        f"(--gpu-rate), {ref['bytes_per_image'] / 1e6:.2f} MB/image and "
        f"{ref['coordinator_cpu_ms']:.1f} ms coordinator CPU per image as measured above"
    )
    for line in project(ref["bytes_per_image"], ref["coordinator_cpu_ms"], args.gpu_rate):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
