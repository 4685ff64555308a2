"""Shell completion: subcommands, option values, model names and tag names (issue #9)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import run_tagd, write_config
from test_search_semantics import build_index


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("completion")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "tagd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m tagd "$@"\n')
    wrapper.chmod(0o755)
    script = tmp / "tagd.bash"
    script.write_text(run_tagd("completion", "bash").stdout)
    idx = build_index(tmp)
    cfg = write_config(
        tmp / "c.yaml",
        {
            "database": str(idx.db),
            "watch": [str(tmp)],
            "models": [{"name": "wd", "path": "."}, {"name": "dd", "path": "."}],
        },
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def complete(*words: str) -> list[str]:
        """COMPREPLY for the command line `words` (the last one is being completed)."""
        quoted = " ".join(f"'{w}'" for w in ("tagd", *words))
        out = subprocess.run(
            [
                "bash",
                "-c",
                f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; _tagd; "
                'printf "%s\\n" "${COMPREPLY[@]}"',
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=60,
        )
        return [x for x in out.stdout.splitlines() if x]

    return complete, str(cfg)


@pytest.mark.slow
def test_bash_completes_words_values_models_and_tags(shell) -> None:
    complete, cfg = shell
    assert complete("ini") == ["init"]
    assert complete("export", "side") == ["sidecars"]
    assert complete("search", "--sort", "") == ["score", "mtime", "path", "random"]
    assert complete("init", "--device", "c") == ["cpu", "cuda"]
    assert complete("-c", cfg, "search", "--model", "") == ["wd", "dd"]
    assert complete("-c", cfg, "search", "model", ":", "d") == ["dd"]
    assert complete("-c", cfg, "search", "1g") == ["1girl"]
    assert sorted(complete("--config", cfg, "tags", "hat")) == ["hat", "hat_ribbon", "hatsune_miku"]
    assert complete("-c", cfg, "search", "--li") == ["--limit"]


def test_dynamic_names_and_fish(shell) -> None:
    _, cfg = shell
    r = run_tagd("-c", cfg, "_complete", "tags", "character:ha")
    assert sorted(r.stdout.split()) == ["character:hakurei_reimu", "character:hatsune_miku"]
    assert run_tagd("-c", cfg, "_complete", "models").stdout.split() == ["wd", "dd"]
    assert "_complete" not in run_tagd("--help").stdout
    fish = run_tagd("completion", "fish").stdout
    assert "-n '__fish_seen_subcommand_from search' -l sort -x -a 'score mtime path random'" in fish
    assert "_complete models" in fish and "_complete tags" in fish
