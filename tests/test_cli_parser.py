"""The parser builds only the typed command's subparser (the import cost of two dozen command
modules is paid by every `tagd search` otherwise) and falls back to all of them when the word
is not a command module of its own."""

from __future__ import annotations

import subprocess
import sys

from tagd.commands.parser import build_parser


def _choices(only: str | None) -> set[str]:
    parser = build_parser(only)
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def test_a_command_word_builds_only_its_subparser() -> None:
    assert _choices("search") == {"search"}
    assert _choices("similar") == {"similar"}


def test_other_words_build_every_subparser() -> None:
    every = _choices(None)
    assert {"search", "stats", "resume", "serve"} <= every
    assert _choices("resume") == every  # registered by the `pause` module
    assert _choices("serach") == every  # a typo gets argparse's full list of choices


def test_search_does_not_import_the_other_commands(tmp_path) -> None:
    code = (
        "import sys\nfrom tagd.cli import main\n"
        "try:\n    main(['search', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('tagd.commands.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()[-1]
    assert "tagd.commands.search" in out
    assert "tagd.commands.stats" not in out and "tagd.commands.serve" not in out
