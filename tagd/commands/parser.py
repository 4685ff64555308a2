"""The argument parser: global options and every command's subparser (used by `tagd` itself
and by `tagd completion`, which reads it to complete words)."""

from __future__ import annotations

import argparse
import importlib

from tagd import __version__
from tagd.commands import COMMAND_MODULES


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's subparser, or with `only` (the command word a user typed) just that
    one: importing all two dozen command modules costs ~0.1 s of every `tagd search`."""
    if only is not None and only not in COMMAND_MODULES:
        only = None
    parser = argparse.ArgumentParser(
        prog="tagd",
        description="Auto-tag image galleries with ONNX tagger models and search the tags.",
        epilog="Config: --config, else $TAGD_CONFIG, else ~/.config/tagd/config.yaml, "
        "else /etc/tagd/config.yaml.",
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="configuration file (YAML)")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="more log output")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"tagd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES if only is None else (only,):
        importlib.import_module(f"tagd.commands.{name}").register(sub)
    if only is not None and only not in sub.choices:
        return build_parser()
    for command in sub.choices.values():
        _add_json_alias(command)
    return parser


def _add_json_alias(parser: argparse.ArgumentParser) -> None:
    """Every command that can print JSON also takes `--json`, the same as `--format json`."""
    options = {o for action in parser._actions for o in action.option_strings}
    fmt = next((a for a in parser._actions if "--format" in a.option_strings), None)
    if "--json" in options or fmt is None or "json" not in (fmt.choices or ()):
        return
    parser.add_argument(
        "--json", dest="format", action="store_const", const="json", help="same as --format json"
    )
