"""The parallel pipeline on real parts: worker processes, ONNX Runtime, SQLite files."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from conftest import save
from crashing_decoder import CrashingDecoder
from onnx_models import build_probe_model, probe_reference, write_selected_tags
from PIL import Image

from tagd import config as cfgmod
from tagd.config import InferenceConfig, ModelConfig
from tagd.index import db, jobs
from tagd.ingest import scanner
from tagd.tagging import sizing
from tagd.tagging.decode import open_image
from tagd.tagging.families import WD14
from tagd.tagging.hub import ModelFiles
from tagd.tagging.pipeline import Pipeline
from tagd.tagging.preprocess import prepare
from tagd.tagging.tagger import (
    CPU,
    CUDA,
    TENSORRT,
    Tagger,
    load_all,
    providers_for,
    session_options,
)
from tagd.tagging.workers import DecodePool


class CrashingPipeline(Pipeline):
    def decoder_factory(self):  # type: ignore[no-untyped-def]
        return functools.partial(CrashingDecoder, self.setup())


def _config(tmp_path: Path, gallery: Path, model: Path, **inference: object) -> cfgmod.Config:
    data = {
        "database": str(tmp_path / "tagd.db"),
        "watch": [str(gallery)],
        "models": [{"name": "probe", "path": str(model)}],
        "inference": {"device": "cpu", **inference},
    }
    return cfgmod.parse(data, base=tmp_path)


def _big_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    Image.fromarray(small).resize((2400, 1800), Image.Resampling.BICUBIC).save(path, quality=90)
    return path


def test_workers_tag_everything_and_bad_files_fail_alone(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    good = [
        save(gallery / f"c{i}.png", (40 * i % 256, 200 - 20 * i, 30 + 25 * i)) for i in range(7)
    ]
    good.append(_big_jpeg(gallery / "big.jpg"))
    good.append(save(gallery / "copy.png", (0, 200, 30)))  # same colour as c0, its own file
    (gallery / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (gallery / "empty.png").write_bytes(b"")
    (gallery / "crash.png").write_bytes(good[0].read_bytes())
    config = _config(tmp_path, gallery, probe_model, batch_size=2, decode_workers=1)
    conn = db.connect(config.database)
    scanner.scan(conn, config)
    with CrashingPipeline(conn, config, load_all(config)) as pipeline:
        assert pipeline.batch_size == 2 and pipeline.plan.decode_workers == 1
        progress: list[int] = []
        pipeline.on_progress = lambda o: progress.append(o.done + o.failed + o.retrying)
        outcome = pipeline.run()
        pool = pipeline._pool
        assert pool is not None and pool.size == 1 and pool.crashes == 1
    assert (outcome.done, outcome.failed, outcome.retrying) == (len(good), 2, 1)
    assert progress == sorted(progress) and progress[-1] == len(good) + 3
    errors = dict(outcome.errors)
    assert "decoder crashed" in errors[str(gallery / "crash.png")]
    assert "not a recognised image" in errors[str(gallery / "corrupt.jpg")]
    spec = WD14.preprocess.with_size(448, 448)
    for path in good:
        file = conn.execute(
            "SELECT f.* FROM paths p JOIN files f ON f.id = p.file_id WHERE p.path = ?",
            (str(path),),
        ).fetchone()
        image = Image.open(path)
        assert (file["width"], file["height"], file["format"]) == (*image.size, image.format)
        stored = dict(
            conn.execute(
                "SELECT mt.idx, s.score FROM scores s JOIN model_tags mt "
                "ON mt.tag_id = s.tag_id AND mt.model_id = s.model_id WHERE s.file_id = ?",
                (file["id"],),
            ).fetchall()
        )
        expected = probe_reference(prepare(open_image(path.read_bytes(), max_pixels=10**9), spec))
        # the big JPEG went through draft decoding: close to the full decode, not equal
        tol = 2e-2 if path.suffix == ".jpg" else 1e-2  # ORT float32 sums vary with batch
        for idx in np.flatnonzero(expected > 0.1):
            assert stored[int(idx)] == pytest.approx(expected[idx], abs=tol), (path, idx)
    tagged_at = conn.execute("SELECT file_id, tagged_at FROM taggings ORDER BY 1").fetchall()
    for path in good:
        jobs.enqueue(conn, str(path), None, None, requeue=True)
    with Pipeline(conn, config, load_all(config)) as again:
        assert again.run().done == len(good)
    assert (
        conn.execute("SELECT file_id, tagged_at FROM taggings ORDER BY 1").fetchall() == tagged_at
    )


def test_stop_hands_back_unfinished_jobs_and_in_flight_is_bounded(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    for i in range(30):
        save(gallery / f"{i:02d}.png", (i * 8, 255 - i * 8, 100))
    config = _config(tmp_path, gallery, probe_model, batch_size=2, decode_workers=1)
    conn = db.connect(config.database)
    assert scanner.scan(conn, config).queued == 30
    pipeline = Pipeline(conn, config, load_all(config))
    bound = pipeline.in_flight_limit + 3 * pipeline.batch_size
    peak = 0

    def stop() -> bool:
        nonlocal peak
        counts = jobs.counts(conn)
        peak = max(peak, counts["running"])
        return counts["done"] >= 10

    try:
        outcome = pipeline.run(stop=stop)
    finally:
        pipeline.close()
    counts = jobs.counts(conn)
    assert counts["running"] == 0 and counts["failed"] == 0
    assert counts["done"] == outcome.done >= 10 and counts["queued"] == 30 - outcome.done
    assert 0 < peak <= bound < 30
    attempts = {r[0] for r in conn.execute("SELECT attempts FROM jobs WHERE state = 'queued'")}
    assert attempts == {0}


def test_short_last_batch_padding_changes_nothing(tmp_path: Path, probe_model: Path) -> None:
    files = ModelFiles(probe_model / "model.onnx", probe_model / "selected_tags.csv", "t")
    tagger = Tagger(
        ModelConfig(name="t", path=probe_model), WD14, files, InferenceConfig(device="cpu")
    )
    batch = np.random.default_rng(0).uniform(0, 255, (3, 448, 448, 3)).astype(np.float32)
    np.testing.assert_allclose(tagger.predict(batch, pad_to=8), tagger.predict(batch), atol=1e-6)
    fixed = tmp_path / "fixed"
    build_probe_model(fixed / "model.onnx", size=64, batch=1)
    write_selected_tags(fixed / "selected_tags.csv")
    files = ModelFiles(fixed / "model.onnx", fixed / "selected_tags.csv", "t")
    one = Tagger(ModelConfig(name="t", path=fixed), WD14, files, InferenceConfig(device="cpu"))
    small = batch[:, :64, :64, :]
    out = one.predict(small, pad_to=8)
    assert out.shape == (3, len(one.labels))
    np.testing.assert_allclose(out[1], probe_reference(small[1]), rtol=1e-4, atol=1e-5)


def test_tensorrt_goes_first_when_asked_and_never_on_cpu() -> None:
    avail = [TENSORRT, CUDA, CPU]
    chain = providers_for(InferenceConfig(device="cuda", device_id=2, tensorrt=True), avail)
    assert [p[0] if isinstance(p, tuple) else p for p in chain] == [TENSORRT, CUDA, CPU]
    assert chain[0][1]["device_id"] == 2 and chain[0][1]["trt_engine_cache_enable"]
    assert chain[1][1] == {
        "device_id": 2,
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }
    assert providers_for(InferenceConfig(device="cpu", tensorrt=True), avail) == [CPU]


def test_session_threads_are_what_the_plan_leaves() -> None:
    assert session_options(3).intra_op_num_threads == 3
    assert session_options(None).intra_op_num_threads == 0  # ORT's own choice
    cpu = sizing.plan(InferenceConfig(), gpu=False, cores=8)
    assert (cpu.decode_workers, cpu.ort_threads, cpu.batch_size) == (8, 8, 2)
    split = sizing.plan(InferenceConfig(decode_workers=3), gpu=False, cores=8)
    assert (split.decode_workers, split.ort_threads) == (3, 5)
    gpu = sizing.plan(InferenceConfig(), gpu=True, cores=8)
    assert (gpu.decode_workers, gpu.ort_threads, gpu.batch_size) == (7, 1, 32)
    assert sizing.plan(InferenceConfig(), gpu=False, cores=1).decode_workers == 1
    mine = sizing.plan(
        InferenceConfig(decode_workers=0, threads=6, batch_size=3), gpu=True, cores=8
    )
    assert (mine.decode_workers, mine.ort_threads, mine.batch_size) == (0, 6, 3)
    assert sizing.available_cores() >= 1


def test_trickle_decodes_in_one_worker_until_a_backlog_appears(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    """Never in the tagd process (a hang could not be timed out there): one worker for the
    trickle, grown to decode_workers once a full batch shows a backlog."""
    paths = [save(gallery / f"{i:02d}.png", (i * 20, 90, 255 - i * 20)) for i in range(9)]
    config = _config(tmp_path, gallery, probe_model, batch_size=4, decode_workers=2)
    conn = db.connect(config.database)
    jobs.enqueue(conn, str(paths[0]), None, None)
    calls = 0
    sizes: list[int] = []

    def stop() -> bool:
        nonlocal calls
        calls += 1
        if pipeline._pool is not None:
            sizes.append(pipeline._pool.size)
        if calls == 3:  # after the first, one-file claim: a burst arrives
            for p in paths[1:]:
                jobs.enqueue(conn, str(p), None, None)
        return False

    with Pipeline(conn, config, load_all(config)) as pipeline:
        outcome = pipeline.run(stop=stop)
        assert pipeline._pool is not None and pipeline._pool.size == 2
    assert sizes[0] == 1 and sizes[-1] == 2
    assert outcome.done == 9 and jobs.counts(conn)["done"] == 9
    with Pipeline(conn, config, load_all(config)) as small:
        jobs.enqueue(conn, str(paths[0]), None, None, requeue=True)
        assert small.run().done == 1 and small._pool is not None and small._pool.size == 1


def test_the_first_batch_is_one_image_then_full_batches(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    """The first result comes after one image is decoded and run, with nothing decoding
    beside that run (on 2 cores the decoders slowed it from 0.7 to 1.1 s): a scan or a
    daemon shows progress sooner; every later batch is full."""
    for i in range(9):
        save(gallery / f"f{i}.png", (20 * i, 90, 200 - 10 * i))
    config = _config(tmp_path, gallery, probe_model, batch_size=4, decode_workers=1)
    conn = db.connect(config.database)
    scanner.scan(conn, config)
    sizes: list[int] = []
    submitted: list[int] = []
    decoding_at_first_run: list[int] = []
    real_submit = DecodePool.submit

    def submit(self, task):  # type: ignore[no-untyped-def]
        submitted.append(task.id)
        return real_submit(self, task)

    with Pipeline(conn, config, load_all(config)) as pipeline:
        real = pipeline.infer

        def infer(prepared):  # type: ignore[no-untyped-def]
            if not sizes:
                decoding_at_first_run.append(len(submitted))
            sizes.append(len(prepared))
            return real(prepared)

        pipeline.infer = infer  # type: ignore[method-assign]
        DecodePool.submit = submit  # type: ignore[method-assign]
        try:
            assert pipeline.run().done == 9
        finally:
            DecodePool.submit = real_submit  # type: ignore[method-assign]
    assert sizes == [1, 4, 4]
    assert decoding_at_first_run == [1]  # only the image being run was handed to a decoder
