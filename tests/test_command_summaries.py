"""Every long command ends with one stderr line: counts, elapsed seconds and files/s; on a
terminal a progress bar shows meanwhile, with log lines kept above it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config
from hydrus_server import HydrusServer, HydrusState
from indexdb import make_index, sha_of
from ptyrun import PtyRun

RATE = r"in \d+\.\d s \(\d+\.\d files/s\)"


def summary(stderr: str, pattern: str) -> re.Match[str]:
    line = [x for x in stderr.splitlines() if x.startswith("tagd: ")][-1]
    m = re.fullmatch(pattern + " " + RATE, line)
    assert m, f"{line!r} does not match {pattern!r}"
    return m


@pytest.fixture
def scanned(tmp_path: Path, gallery: Path, probe_model: Path) -> Path:
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (20, 20, 20)]):
        save(gallery / f"{i}.png", color, (120 + i, 100))
    conf = write_config(
        tmp_path / "config.yaml",
        {
            "database": str(tmp_path / "tagd.db"),
            "watch": [str(gallery)],
            "models": [{"name": "probe", "path": str(probe_model), "score_floor": 0.3}],
            "inference": {"device": "cpu"},
        },
    )
    r = run_tagd("-c", str(conf), "scan")
    assert r.returncode == 0, r.stderr
    return conf


@pytest.mark.slow
def test_reindex_retag_export_eval_end_with_a_summary(scanned: Path, gallery: Path) -> None:
    c = str(scanned)
    r = run_tagd("-c", c, "reindex", "--no-progress")
    assert r.returncode == 0, r.stderr
    summary(r.stderr, r"tagd: reindexed 3 files for 1 model, \d+ rows changed")

    r = run_tagd("-c", c, "retag", "--model", "probe", "--all")
    assert r.returncode == 0, r.stderr
    summary(r.stderr, r"tagd: retag probe: queued 3 of 3 matching files")
    r = run_tagd("-c", c, "retag", "--model", "probe", "blue")
    summary(r.stderr, r"tagd: retag probe: queued 0 of 0 matching files")

    for fmt in ("csv", "jsonl"):
        r = run_tagd("-c", c, "export", "--format", fmt)
        assert r.returncode == 0, r.stderr
        summary(r.stderr, r"tagd: exported 3 files")
    r = run_tagd("-c", c, "export", "sidecars", "--style", "hydrus")
    assert r.returncode == 0, r.stderr
    summary(r.stderr, r"tagd: sidecars: 3 written, 0 unchanged, .* 0 failed")

    truth = gallery.parent / "truth.csv"
    truth.write_text(f'path,tags\n{gallery / "0.png"},"red"\n{gallery / "1.png"},"blue"\n')
    r = run_tagd("-c", c, "eval", "-m", "probe", "--truth", str(truth))
    assert r.returncode == 0, r.stderr
    summary(r.stderr, r"tagd: eval: 3 files read, scored with ground truth: probe 2")


def test_hydrus_sync_ends_with_a_summary(tmp_path: Path) -> None:
    make_index(tmp_path / "t.db", {"/g/a.png": {"general": 0.9, "solo": 0.9}}).close()
    state = HydrusState(access_key="a" * 64)
    state.add_file(sha_of("/g/a.png"))
    with HydrusServer(state) as server:
        conf = write_config(
            tmp_path / "c.yaml",
            {
                "database": str(tmp_path / "t.db"),
                "hydrus": {"url": server.url, "access_key_env": "HK"},
            },
        )
        r = run_tagd("-c", str(conf), "hydrus", "sync", env={"HK": "a" * 64})
    assert r.returncode == 0, r.stderr
    summary(r.stderr, r"tagd: hydrus: 1 of 1 files checked, .* deleted in Hydrus")


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.slow
def test_sidecars_bar_on_a_terminal_keeps_error_lines_out(scanned: Path, gallery: Path) -> None:
    (gallery / "0.png.txt").mkdir()  # that sidecar cannot be written
    # Wide enough that rich does not wrap the long tmp path of the error line.
    run = PtyRun(
        ["-c", str(scanned), "export", "sidecars", "--style", "hydrus"], {"COLUMNS": "400"}
    )
    try:
        assert run.wait() == 3, run.text()
    finally:
        run.close()
    raw = run.text()
    assert "sidecars (hydrus)" in raw, raw  # the bar was drawn
    segments = [ANSI.sub("", s) for s in re.split(r"\r\n|\r|\n", raw)]
    errors = [s for s in segments if "cannot write" in s]
    assert len(errors) == 1, raw
    assert re.fullmatch(r"tagd: cannot write \S+0\.png\.txt:.*", errors[0]), errors[0]
    summary("\n".join(segments), r"tagd: sidecars: 2 written, 0 unchanged, .* 1 failed")
