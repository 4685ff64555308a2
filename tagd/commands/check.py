"""`tagd check`: is everything in place? One line per check, each failure with its fix."""

from __future__ import annotations

import argparse

from tagd.commands import Context


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="check config, roots, models, database (a doctor)",
        description="Check the config, every watch root, every model (loaded for real: files, "
        "label file against the graph, the provider that runs), the database, free disk space, "
        "inotify watches, Hydrus and the Ray cluster (`cluster:`: reachable, nodes, versions). "
        "Exit 0 when all pass, 1 otherwise. A model that is not in "
        "the Hugging Face cache is fetched, as `tagd models pull` would.",
    )
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    from tagd.config import ConfigError, find_config, load
    from tagd.doctor import Check, run_checks

    try:
        config = load(ctx.args.config)
    except ConfigError as exc:
        print(Check("config", False, str(exc)).line(), flush=True)
        return 1
    where = config.source or find_config(ctx.args.config)
    print(Check("config", True, f"{where} is valid").line(), flush=True)
    failed = 0
    for check in run_checks(config):
        print(check.line(), flush=True)
        failed += not check.ok
    if failed:
        print(f"{failed} check{'s' if failed != 1 else ''} failed")
        return 1
    print("all checks passed")
    return 0
