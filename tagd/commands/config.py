"""`tagd config example`: the fully commented example config, for pip users without the repo."""

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


def run(ctx: Context) -> int:
    from tagd.initconfig import example_text

    sys.stdout.write(example_text())
    return 0
