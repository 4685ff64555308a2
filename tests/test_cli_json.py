"""Every listing command speaks JSON with `--json` (the same as `--format json`)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_tagd, save

from tagd.cli import build_parser


def test_every_json_capable_command_takes_json_flag() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        options = {o for action in command._actions for o in action.option_strings}
        fmt = next((a for a in command._actions if "--format" in a.option_strings), None)
        if fmt is not None and "json" in (fmt.choices or ()):
            assert "--json" in options, name


def test_listing_commands_print_json(config_file: Path, gallery: Path) -> None:
    save(gallery / "red.png", (255, 0, 0))
    (gallery / "broken.png").write_bytes(b"not an image")
    assert run_tagd("-c", str(config_file), "scan").returncode == 0
    for args, check in (
        (("jobs", "--failed"), lambda d: d[0]["path"].endswith("broken.png")),
        (("stats",), lambda d: isinstance(d, dict)),
        (("status",), lambda d: isinstance(d, dict)),
        (("tags", "--top", "3"), lambda d: len(d) <= 3),
        (("models",), lambda d: d[0]["name"] == "probe"),
        (("show", str(gallery / "red.png")), lambda d: "probe" in d["models"]),
        (("search", "red"), lambda d: d[0]["path"].endswith("red.png")),
    ):
        r = run_tagd("-c", str(config_file), *args, "--json")
        assert r.returncode == 0, (args, r.stderr)
        assert check(json.loads(r.stdout)), (args, r.stdout)
