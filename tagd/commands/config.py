"""`tagd config example`: the fully commented example config, for pip users without the repo;
`tagd config reference`: every key's default, accepted values and meaning, from the schema."""

from __future__ import annotations

import argparse
import sys

from tagd.commands import Context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the example config",
        description="Print the example config with every key documented.",
        epilog="example: tagd config example > ~/.config/tagd/config.yaml",
    )
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    ex = actions.add_parser("example", help="print the commented example config")
    ex.set_defaults(func=run)
    ref = actions.add_parser(
        "reference", help="print every key with its default, accepted values and meaning"
    )
    ref.set_defaults(func=run_reference)


def run(ctx: Context) -> int:
    from tagd.initconfig import example_text

    sys.stdout.write(example_text())
    return 0


def run_reference(ctx: Context) -> int:
    """docs/config.md, rendered from the schema the parser reads."""
    from tagd.config import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0
