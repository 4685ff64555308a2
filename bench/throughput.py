"""How close tagd's pipeline gets to the limits of the machine it runs on.

For a compute-bound model (random-weight ViT-B/16 at 448 px, 10861 outputs: the shape of
wd-vit-tagger-v3) and a decode-bound one (the tiny model with the same I/O), measured in one
run on the same machine:

- raw: ONNX Runtime img/s on already-preprocessed tensors, same batch size, all cores;
- decode: parallel read + hash + decode + preprocess img/s over the corpus, all cores
  (tagd's own decode path, JPEG draft included);
- limit: 1 / (1/raw + 1/decode) where inference runs on the CPU (both share the cores),
  min(raw, decode) where it runs on a GPU;
- tagd: `Pipeline.run()` end to end (queue → decode workers → model → SQLite), img/s;
- reference: decode one image (full decode), preprocess, run batch 1, next: the loop of the
  common Python taggers;
- peak RSS (tagd process + decode workers) while draining a large job backlog;
- videos (#13): `Pipeline.run()` over H.264 clips with the tiny model, files/s and sampled
  frames/s (each clip is seeked to `video.frames` times, never decoded whole).

Run ``python -m bench.throughput`` (``--quick`` for a smaller run). Models and corpora are
cached under ``--workdir``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.corpus import build_corpus
from bench.models import REVISION, build_tiny_tagger, build_vit_tagger, write_selected_tags
from tagd import config as cfgmod
from tagd.config import InferenceConfig, ModelConfig
from tagd.index import db
from tagd.index import jobs as queue
from tagd.ingest import scanner
from tagd.tagging import sizing
from tagd.tagging.decode import open_image, read_file
from tagd.tagging.families import WD14
from tagd.tagging.hub import ModelFiles
from tagd.tagging.pipeline import Pipeline
from tagd.tagging.preprocess import prepare
from tagd.tagging.tagger import Tagger
from tagd.tagging.workers import Decoded, DecodePool, Decoder, Setup, Task


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir(workdir: Path, name: str) -> Path:
    """The cached model, rebuilt when bench/models.py's REVISION differs from the one cached."""
    folder = workdir / "models" / name
    stamp = folder / ".revision"
    if not stamp.exists() or stamp.read_text().strip() != str(REVISION):
        log(f"building {name} model in {folder}")
        build = build_vit_tagger if name == "vit" else build_tiny_tagger
        build(folder / "model.onnx")
        write_selected_tags(folder / "selected_tags.csv")
        stamp.write_text(f"{REVISION}\n")
    return folder


def corpus(workdir: Path, n: int) -> list[Path]:
    folder = workdir / f"corpus-{n}"
    done = folder / ".complete"
    if not done.exists():
        log(f"building a corpus of {n} images in {folder}")
        build_corpus(folder, n, jobs=sizing.available_cores())
        done.touch()
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def open_tagger(folder: Path, inference: InferenceConfig, threads: int | None) -> Tagger:
    files = ModelFiles(folder / "model.onnx", folder / "selected_tags.csv", "bench")
    return Tagger(
        ModelConfig(name=folder.name, path=folder), WD14, files, inference, threads=threads
    )


def measure_raw(tagger: Tagger, batch: int, images: int) -> float:
    """img/s of session.run alone on ready tensors, after one warm-up batch."""
    h, w = tagger.spec.size
    x = np.random.default_rng(0).uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
    tagger.predict(x)
    runs = max(1, math.ceil(images / batch))
    start = time.perf_counter()
    for _ in range(runs):
        tagger.predict(x)
    return runs * batch / (time.perf_counter() - start)


def measure_decode(paths: list[Path], spec_size: tuple[int, int], workers: int) -> float:
    """img/s of read + hash + decode + preprocess in `workers` processes (started beforehand)."""
    spec = WD14.preprocess.with_size(*spec_size)
    setup = Setup(specs={"m": spec}, model_ids={"m": 1}, max_pixels=150_000_000)
    with DecodePool(functools.partial(Decoder, setup), workers) as pool:
        warm = Task(-1, str(paths[0]), ("m",))
        pool.submit(warm)
        assert pool.get(timeout=120) is not None
        start = time.perf_counter()
        for i, p in enumerate(paths):
            pool.submit(Task(i, str(p), ("m",)))
        for _ in paths:
            r = pool.get(timeout=300)
            if not isinstance(r, Decoded):
                raise RuntimeError(f"decode failed: {r}")
        return len(paths) / (time.perf_counter() - start)


def measure_reference(tagger: Tagger, paths: list[Path]) -> float:
    """One image at a time: full decode, preprocess, batch-1 inference."""
    start = time.perf_counter()
    for p in paths:
        image = open_image(read_file(str(p)).data, max_pixels=150_000_000)
        tagger.predict(prepare(image, tagger.spec)[None])
    return len(paths) / (time.perf_counter() - start)


def pipeline_config(workdir: Path, gallery: Path, model: Path, inference: InferenceConfig):
    return replace(
        cfgmod.parse(
            {
                "database": str(workdir / "bench.db"),
                "watch": [str(gallery)],
                "models": [{"name": model.name, "path": str(model)}],
            },
            base=workdir,
        ),
        inference=inference,
    )


def measure_tagd(
    workdir: Path, gallery: Path, model: Path, inference: InferenceConfig, tagger: Tagger
) -> tuple[float, Pipeline]:
    """img/s of Pipeline.run() over a freshly queued gallery (workers already started)."""
    config = pipeline_config(workdir, gallery, model, inference)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{config.database}{suffix}").unlink(missing_ok=True)
    conn = db.connect(config.database)
    queued = scanner.scan(conn, config).queued
    pipeline = Pipeline(conn, config, [tagger])
    pipeline.pool()
    h, w = tagger.spec.size
    tagger.predict(np.zeros((pipeline.batch_size, h, w, 3), np.float32))  # as raw: warm session
    start = time.perf_counter()
    outcome = pipeline.run()
    elapsed = time.perf_counter() - start
    pipeline.close()
    if outcome.done != queued:
        raise RuntimeError(f"tagd tagged {outcome.done} of {queued}: {outcome.errors[:3]}")
    conn.close()
    return queued / elapsed, pipeline


def video_corpus(workdir: Path, n: int, seconds: int = 20) -> Path:
    """n H.264 clips, 640x360 at 24 fps, each frame a different colour field."""
    import av

    folder = workdir / f"videos-{n}-{seconds}s"
    done = folder / ".complete"
    if done.exists():
        return folder
    log(f"building {n} video clips of {seconds} s in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        with av.open(str(folder / f"clip{i:03d}.mp4"), "w") as out:
            stream = out.add_stream("libx264", rate=24, options={"preset": "ultrafast"})
            stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
            base = rng.integers(0, 256, (9, 16, 3)).astype(np.float32)
            for f in range(24 * seconds):
                arr = np.clip(base + 40 * math.sin(f / 12), 0, 255).astype(np.uint8)
                arr = np.repeat(np.repeat(arr, 40, axis=0), 40, axis=1)
                frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    done.touch()
    return folder


def measure_videos(
    workdir: Path, n: int, model: Path, inference: InferenceConfig, tagger: Tagger
) -> tuple[float, float]:
    """(files/s, sampled frames/s) of Pipeline.run() over n clips."""
    gallery = video_corpus(workdir, n)
    config = pipeline_config(workdir, gallery, model, inference)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{config.database}{suffix}").unlink(missing_ok=True)
    conn = db.connect(config.database)
    queued = scanner.scan(conn, config).queued
    pipeline = Pipeline(conn, config, [tagger])
    pipeline.pool()
    start = time.perf_counter()
    outcome = pipeline.run()
    elapsed = time.perf_counter() - start
    pipeline.close()
    conn.close()
    if outcome.done != queued:
        raise RuntimeError(f"tagd tagged {outcome.done} of {queued}: {outcome.errors[:3]}")
    files = queued / elapsed
    return files, files * config.video.frames


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_backlog(
    workdir: Path,
    files: list[Path],
    model: Path,
    inference: InferenceConfig,
    tagger: Tagger,
    jobs: int,
    seconds: float,
) -> dict[str, float]:
    """Queue `jobs` jobs (hard links to real images, every one decoded), drain for `seconds`."""
    links = workdir / f"backlog-{jobs}"
    if not (links / ".complete").exists():
        shutil.rmtree(links, ignore_errors=True)
        links.mkdir(parents=True)
        for i in range(jobs):
            src = files[i % len(files)]
            os.link(src, links / f"{i:07d}{src.suffix}")
        (links / ".complete").touch()
    config = pipeline_config(workdir, links, model, inference)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{config.database}{suffix}").unlink(missing_ok=True)
    conn = db.connect(config.database)
    with db.write(conn):
        for p in sorted(links.iterdir()):
            if not p.name.startswith("."):
                queue.enqueue(conn, str(p), None, None, force_models=(model.name,))
    pipeline = Pipeline(conn, config, [tagger])
    pool = pipeline.pool()
    samples: list[tuple[float, int]] = []
    halt = threading.Event()

    def sample() -> None:
        while not halt.is_set():
            pids = [os.getpid(), *(p for p in pool.pids if p)]
            samples.append((time.perf_counter(), sum(rss_kib(p) for p in pids)))
            halt.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    before = rss_kib(os.getpid()) + sum(rss_kib(p) for p in pool.pids if p)
    start = time.perf_counter()
    sampler.start()
    stop: Callable[[], bool] = lambda: time.perf_counter() - start > seconds  # noqa: E731
    outcome = pipeline.run(stop=stop)
    elapsed = time.perf_counter() - start
    halt.set()
    sampler.join()
    pipeline.close()
    left = queue.counts(conn)["queued"]
    conn.close()
    mid = start + elapsed / 2
    first = max((r for t, r in samples if t < mid), default=0)
    second = max((r for t, r in samples if t >= mid), default=0)
    return {
        "jobs": jobs,
        "done": outcome.done,
        "left": left,
        "seconds": elapsed,
        "rss_before_mib": before / 1024,
        "peak_first_half_mib": first / 1024,
        "peak_second_half_mib": second / 1024,
        "peak_mib": max(first, second) / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="small corpora and backlog (minutes)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tagd-bench"))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--batch", type=int, default=None, help="default: tagd's default for the device"
    )
    ap.add_argument("--vit-images", type=int, default=None)
    ap.add_argument("--tiny-images", type=int, default=None)
    ap.add_argument("--backlog", type=int, default=None)
    ap.add_argument("--backlog-seconds", type=float, default=None)
    ap.add_argument("--decode-workers", type=int, default=None, help="tagd's; default: automatic")
    ap.add_argument(
        "--threads", type=int, default=None, help="tagd's ORT threads; default: automatic"
    )
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--backlog-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--videos", type=int, default=None, help="video clips (default 8/24)")
    ap.add_argument("--videos-only", action="store_true", help="only the video case")
    args = ap.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    quick = args.quick
    n_vit = args.vit_images or (8 if quick else 32)
    n_tiny = args.tiny_images or (48 if quick else 160)
    backlog = (20_000 if quick else 100_000) if args.backlog is None else args.backlog
    backlog_s = args.backlog_seconds or (20.0 if quick else 60.0)
    gpu = args.device == "cuda"
    cores = sizing.available_cores()
    inference = InferenceConfig(
        device=args.device,
        batch_size=args.batch,
        decode_workers=args.decode_workers,
        threads=args.threads,
    )
    plan = sizing.plan(inference, gpu=gpu, cores=cores)
    batch = plan.batch_size
    if args.backlog_only:
        return backlog_only(args, inference, plan)
    n_videos = args.videos if args.videos is not None else (8 if quick else 24)
    if args.videos_only:
        return videos_only(args.workdir, n_videos, inference, plan)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    small, large = corpus(workdir, n_vit), corpus(workdir, n_tiny)
    raw_inference = InferenceConfig(device=args.device, threads=None if gpu else cores)
    print(f"machine: {cores} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"tagd plan: {plan.decode_workers} decode workers, {plan.ort_threads} ORT threads, "
        f"batch {batch}; device {args.device}"
    )
    results: dict[str, dict[str, float]] = {}
    for name, paths in (("vit", small), ("tiny", large)):
        if name == "vit" and args.skip_vit:
            continue
        folder = model_dir(workdir, name)
        bound = "compute-bound (ViT-B/16 448)" if name == "vit" else "decode-bound (tiny model)"
        log(f"{bound}: {len(paths)} images")
        decode = measure_decode(paths, (448, 448), cores)  # before any session holds memory
        raw_tagger = open_tagger(folder, raw_inference, None)
        raw = measure_raw(raw_tagger, batch, max(len(paths), 2 * batch))
        ref = measure_reference(raw_tagger, paths[: max(4, len(paths) // 2)])
        del raw_tagger
        limit = min(raw, decode) if gpu else 1.0 / (1.0 / raw + 1.0 / decode)
        tagger = open_tagger(folder, inference, plan.ort_threads)
        tagd, _ = measure_tagd(workdir, paths[0].parent, folder, inference, tagger)
        results[name] = {"raw": raw, "decode": decode, "limit": limit, "tagd": tagd, "ref": ref}
        print(f"\n{bound}, {len(paths)} images, batch {batch}")
        print(f"  raw ONNX Runtime      {raw:8.2f} img/s")
        print(f"  parallel decode       {decode:8.2f} img/s ({cores} processes)")
        print(f"  limit                 {limit:8.2f} img/s")
        print(
            f"  tagd end to end       {tagd:8.2f} img/s  = {tagd / limit:.2f} x limit, "
            f"{tagd / raw:.2f} x raw"
        )
        print(
            f"  reference loop        {ref:8.2f} img/s  = {ref / limit:.2f} x limit; "
            f"tagd / reference = {tagd / ref:.2f}"
        )
    if n_videos:
        videos_only(workdir, n_videos, inference, plan)
    if backlog:
        # A fresh process: the ViT sessions above would otherwise stay in this one's RSS.
        sys.stdout.flush()
        forward = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if v is not None and k in ("workdir", "device", "batch", "decode_workers", "threads")
        ]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.throughput",
                *forward,
                f"--backlog={backlog}",
                f"--backlog-seconds={backlog_s}",
                f"--tiny-images={n_tiny}",
                "--backlog-only",
            ],
            check=True,
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def videos_only(workdir: Path, n: int, inference: InferenceConfig, plan: sizing.Plan) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    folder = model_dir(workdir, "tiny")
    tagger = open_tagger(folder, inference, plan.ort_threads)
    files, frames = measure_videos(workdir, n, folder, inference, tagger)
    print(f"\nvideos: {n} H.264 clips, 640x360, 20 s at 24 fps (tiny model, 5 frames each)")
    print(f"  tagd end to end       {files:8.2f} files/s, {frames:.1f} sampled frames/s")
    return 0


def backlog_only(args: argparse.Namespace, inference: InferenceConfig, plan: sizing.Plan) -> int:
    folder = model_dir(args.workdir, "tiny")
    files = corpus(args.workdir, args.tiny_images)
    tagger = open_tagger(folder, inference, plan.ort_threads)
    log(f"backlog: {args.backlog} jobs, draining for {args.backlog_seconds:.0f} s")
    b = measure_backlog(
        args.workdir, files, folder, inference, tagger, args.backlog, args.backlog_seconds
    )
    print(f"\nbacklog of {args.backlog} jobs (tiny model, every job decoded), {b['seconds']:.0f} s")
    print(
        f"  tagged {b['done']:.0f}, {b['left']:.0f} left queued; RSS (tagd + workers) "
        f"{b['rss_before_mib']:.0f} MiB before, peak {b['peak_first_half_mib']:.0f} MiB "
        f"in the first half, {b['peak_second_half_mib']:.0f} MiB in the second"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
