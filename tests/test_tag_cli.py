"""`tagd tag` (one-shot, real ONNX session) and `tagd completion`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

from conftest import run_tagd, save

from tagd.tagging.oneshot import parse_provider_options, rules_with


def test_option_parsing() -> None:
    assert parse_provider_options("device_id=1, gpu_mem_limit=2") == (
        ("device_id", "1"),
        ("gpu_mem_limit", "2"),
    )
    assert rules_with({"general": 0.35, "rating": "top", "character": "mcut"}, 0.5) == {
        "general": 0.5,
        "rating": "top",
        "character": 0.5,
        "default": 0.5,
    }


def test_tag_files_and_pipe(
    tmp_path: Path, config_file: Path, gallery: Path, probe_model: Path
) -> None:
    red = save(gallery / "red.jpg", (255, 0, 0), (300, 100), quality=95)
    blue = save(gallery / "blue.png", (0, 0, 255), (120, 120))
    bad = gallery / "bad.png"
    bad.write_bytes(b"not an image")
    r = run_tagd("-c", str(config_file), "tag", "--model", "probe", str(red), str(bad))
    assert r.returncode == 1
    lines = [line.split("\t") for line in r.stdout.splitlines()]
    assert all(p == str(red) for p, _, _ in lines)
    tags = {t: float(s) for _, t, s in lines}
    assert tags["red"] > 0.85 and "character:crimson_knight" in tags and "rating:general" in tags
    assert f"{bad}: not a recognised image format" in r.stderr

    # no config at all: a model folder, paths from stdin, JSON, one threshold for all
    r = run_tagd(
        "tag",
        "--pipe",
        "--model",
        str(probe_model),
        "--cpu",
        "--format",
        "json",
        "--threshold",
        "0.99",
        "--batch",
        "1",
        input=f"{red}\n{blue}\n",
        env={"XDG_CONFIG_HOME": str(tmp_path / "none"), "HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["path"] for x in recs] == [str(red), str(blue)]
    assert "red" not in recs[0]["tags"] and "white_corner" in recs[0]["tags"]
    assert "rating:explicit" in recs[1]["tags"]  # the top-1 rating survives --threshold
    assert all(s >= 0.99 for t, s in recs[1]["tags"].items() if not t.startswith("rating:"))

    r = run_tagd("-c", str(config_file), "tag", "-m", "probe", "--store", str(blue))
    assert r.returncode == 0, r.stderr
    db = sqlite3.connect(config_file.parent / "state" / "tagd.db")
    assert db.execute("SELECT count(*) FROM file_tags WHERE path = ?", (str(blue),)).fetchone()[0]
    assert run_tagd("-c", str(config_file), "search", "blue").stdout.strip() == str(blue)

    for args, msg in [
        (["-m", "nope", str(red)], "no model named 'nope'"),
        (["-m", "probe", "--provider-options", "x", str(red)], "'x' is not key=value"),
        (["-m", "probe"], "no files"),
    ]:
        r = run_tagd("-c", str(config_file), "tag", *args)
        assert r.returncode == 2 and msg in r.stderr, r.stderr


def test_completion_scripts_and_help_examples(tmp_path: Path) -> None:
    r = run_tagd("completion", "bash")
    assert r.returncode == 0
    script = tmp_path / "c.sh"
    script.write_text(r.stdout)
    probe = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=(tagd eval --tr); COMP_CWORD=2; _tagd; "
            'echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.split() == ["--truth", "--truth-service"]
    assert (
        "complete -c tagd -n '__fish_seen_subcommand_from tag' -l pipe"
        in run_tagd("completion", "fish").stdout
    )
    assert run_tagd("completion", "zsh").stdout.startswith("#compdef tagd")
    for cmd in ("hydrus", "export", "tag", "eval", "completion"):
        assert "examples:" in run_tagd(cmd, "--help").stdout, cmd
