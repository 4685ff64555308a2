"""`tagd init`, `tagd config example` and `tagd check` (issue #9, getting started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from conftest import run_tagd, save, write_config
from ptyrun import PtyRun

from tagd.config import load


def init(tmp_path: Path, *args: str, env: dict[str, str] | None = None):
    return run_tagd("init", *args, env={"XDG_CONFIG_HOME": str(tmp_path / "xdg"), **(env or {})})


@pytest.mark.slow
def test_init_writes_a_config_that_loads(tmp_path: Path, gallery: Path, probe_model: Path) -> None:
    save(gallery / "a.png", (200, 10, 10))
    r = init(
        tmp_path,
        "--watch",
        str(gallery),
        "--model",
        str(probe_model),
        "--database",
        str(tmp_path / "state" / "t.db"),
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    target = tmp_path / "xdg" / "tagd" / "config.yaml"
    assert f"wrote {target}" in r.stdout
    assert "inference will run on the CPU" in r.stdout and "CPUExecutionProvider" in r.stdout
    assert "tagd check" in r.stdout and "tagd scan" in r.stdout and "--config" not in r.stdout
    text = target.read_text()
    assert text.startswith("# tagd configuration") and "tagd config example" in text
    cfg = load(str(target))
    assert [w.path for w in cfg.watch] == [gallery.resolve()]
    assert cfg.models[0].path == probe_model.resolve() and cfg.inference.device == "cpu"
    assert (tmp_path / "state").is_dir()
    # Never overwritten without --force; the file is unchanged.
    again = init(tmp_path, "--watch", str(gallery), "--model", "wd-vit-tagger-v3")
    assert again.returncode == 2 and "already exists: pass --force" in again.stderr
    assert target.read_text() == text
    forced = init(tmp_path, "--watch", str(gallery), "--model", "wd-vit-tagger-v3", "--force")
    assert forced.returncode == 0, forced.stderr
    assert load(str(target)).models[0].repo == "SmilingWolf/wd-vit-tagger-v3"


@pytest.mark.slow
def test_init_bad_answers_and_no_terminal(tmp_path: Path, gallery: Path) -> None:
    r = init(tmp_path)
    assert r.returncode == 2 and "no terminal to ask on: pass --watch DIR" in r.stderr
    r = init(tmp_path, "--watch", str(tmp_path / "nope"), "--model", "wd-vit-tagger-v3")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"tagd: init: --watch {tmp_path / 'nope'}: no such folder; create it or fix the path"
    )
    r = init(tmp_path, "--watch", str(gallery), "--model", "wd-typo")
    assert r.returncode == 2 and "--model wd-typo: not a known model" in r.stderr
    assert "wd-vit-tagger-v3" in r.stderr
    r = init(tmp_path, "--watch", str(gallery))
    assert r.returncode == 2 and "--model NAME|PATH is needed" in r.stderr
    assert not (tmp_path / "xdg").exists()


@pytest.mark.slow
def test_init_interactive_on_a_terminal(tmp_path: Path, gallery: Path, probe_model: Path) -> None:
    target = tmp_path / "asked.yaml"
    run = PtyRun(
        ["init", "--config", str(target), "--device", "cpu"],
        env={"XDG_DATA_HOME": str(tmp_path / "data")},
    )
    try:
        run.expect("Gallery folder(s) to watch")
        run.send(str(gallery))
        run.expect("Model (a shortcut, a folder, or owner/name) [wd-vit-tagger-v3]:")
        run.send(str(probe_model))
        run.expect(f"Database file [{tmp_path / 'data' / 'tagd' / 'tagd.db'}]:")
        run.send("")
        assert run.wait() == 0, run.text()
    finally:
        run.close()
    assert f"--config {target} scan" in run.text()
    cfg = load(str(target))
    assert cfg.database == tmp_path / "data" / "tagd" / "tagd.db"
    assert [w.path for w in cfg.watch] == [gallery.resolve()]


def test_config_example_is_packaged_and_valid(tmp_path: Path) -> None:
    r = run_tagd("config", "example")
    assert r.returncode == 0
    data = yaml.safe_load(r.stdout)
    assert data["models"][0]["repo"] == "SmilingWolf/wd-vit-tagger-v3"
    shipped = Path(__file__).parent.parent / "tagd" / "config.example.yaml"
    assert r.stdout == shipped.read_text()


@pytest.mark.slow
def test_check_passes(config_file: Path, gallery: Path) -> None:
    save(gallery / "a.png", (1, 2, 3))
    save(gallery / "sub" / "b.png", (4, 5, 6))
    r = run_tagd("--config", str(config_file), "check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"ok   config: {config_file} is valid"
    assert f"ok   watch[0] {gallery}: readable, 2 images" in lines
    assert any(x.startswith("ok   inotify: 2 watches needed") for x in lines)
    assert any(x.startswith("ok   database ") and x.endswith("will be created") for x in lines)
    model = next(x for x in lines if x.startswith("ok   model probe:"))
    assert "labels match the graph, runs on CPUExecutionProvider" in model
    assert lines[-1] == "all checks passed"
    assert not (config_file.parent / "state" / "tagd.db").exists()


@pytest.mark.slow
def test_check_fails_with_fixes(tmp_path: Path, probe_model: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes((probe_model / "model.onnx").read_bytes())
    labels = (probe_model / "selected_tags.csv").read_text().splitlines()
    (broken / "selected_tags.csv").write_text("\n".join(labels[:-2]) + "\n")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    os.chmod(readonly, 0o555)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(readonly / "t.db"),
            "watch": [str(tmp_path / "unmounted")],
            "models": [
                {"name": "good", "path": str(probe_model)},
                {"name": "short-labels", "path": str(broken)},
                {"name": "gone", "path": str(tmp_path / "nowhere")},
            ],
            "inference": {"device": "cpu"},
        },
    )
    try:
        r = run_tagd("--config", str(cfg), "check")
    finally:
        os.chmod(readonly, 0o755)
    assert r.returncode == 1
    out = r.stdout.splitlines()
    fix = "does not exist -> create it, mount it or fix the path"
    assert f"FAIL watch[0] {tmp_path / 'unmounted'}: {fix}" in out
    if os.geteuid() != 0:
        assert any(x.startswith(f"FAIL database {readonly / 't.db'}: cannot write") for x in out)
    assert any(x.startswith("ok   model good:") for x in out)
    bad = next(x for x in out if x.startswith("FAIL model short-labels:"))
    assert "label" in bad
    assert any(x.startswith("FAIL model gone:") and "does not exist" in x for x in out)
    assert out[-1].endswith("checks failed")


def test_check_with_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("watch: [a]\nmodles: []\n")
    r = run_tagd("--config", str(cfg), "check")
    assert r.returncode == 1
    assert r.stdout.startswith("FAIL config: ") and "did you mean 'models'?" in r.stdout


@pytest.mark.slow
def test_check_counts_files_skipped_by_extension(config_file: Path, gallery: Path) -> None:
    save(gallery / "a.png", (1, 2, 3))
    for name in ("notes.txt", "more.txt", "clip.xyz"):
        (gallery / name).write_text("x")
    r = run_tagd("--config", str(config_file), "check")
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("ok   watch[0]"))
    assert line.endswith("readable, 1 image; 3 other files skipped (.txt 2, .xyz 1)"), line


def test_check_fails_on_a_folder_it_cannot_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tagd import doctor
    from tagd.config import parse
    from tagd.ingest import scanner

    gallery = tmp_path / "g"
    save(gallery / "a.png", (1, 2, 3))
    (gallery / "locked").mkdir()
    real_scandir = scanner.os.scandir

    def scandir(path: str) -> object:
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(scanner.os, "scandir", scandir)
    cfg = parse(
        {"database": str(tmp_path / "t.db"), "watch": [str(gallery)], "models": []},
        base=tmp_path,
    )
    (check,) = list(doctor.check_roots(cfg))
    assert not check.ok
    assert "1 folder(s) cannot be listed" in check.detail and "locked" in check.detail
    assert "read and execute access" in check.fix
