"""`tagd` command line: global options, logging, error handling; commands live in tagd.commands.

Heavy modules (onnxruntime, numpy) are imported by the commands that need them, so
`tagd search` starts fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence

from tagd.commands import Context, UserError
from tagd.commands.parser import build_parser
from tagd.index.inventory import UnknownModel
from tagd.names import for_humans

EXIT_USAGE = 2
EXIT_RUNTIME = 3
# Marks a search word that starts with `-` so argparse takes it as a query term, not an option.
_TERM_MARK = "\ue000"
_GLOBAL_VALUE_OPTIONS = ("--config", "-c")

log = logging.getLogger("tagd")

__all__ = ["build_parser", "main"]


def setup_logging(verbose: int, quiet: bool) -> None:
    """Plain lines on stderr; journald adds its own timestamps, so omit ours under systemd."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if under_systemd
        else ("%(asctime)s %(levelname)s %(message)s")
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_HumanLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler logs every run of every job at INFO: a line a minute in the journal, forever.
    logging.getLogger("apscheduler").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


class _HumanLines(logging.Filter):
    """A file name in a log message cannot forge a log line or drive the terminal: control
    characters and undecodable bytes in the message are escaped (tracebacks are left as they
    are)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = for_humans(message)
        if safe != message:
            record.msg, record.args = safe, None
        return True


def _exact_stdout() -> None:
    """Paths that are not UTF-8 go to stdout as the bytes they are (for `-0`, tsv, csv),
    whatever the locale; without this a UTF-8 locale makes printing one raise."""
    for stream in (sys.stdout, sys.stdin):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


def _command_index(argv: list[str]) -> int | None:
    """Where the subcommand word is: the first word that is neither a global option nor the
    value of one."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _GLOBAL_VALUE_OPTIONS:
            i += 2
            continue
        if word.startswith("-"):
            i += 1
            continue
        return i
    return None


def mark_search_terms(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`tagd search -character:*` or `tagd search "-(a | b)"`: every `-word` after `search`
    that is not one of its options (nor an option's value) is a query term; argparse would
    read it as an unknown option and then miss the required query."""
    at = _command_index(argv)
    if at is None or argv[at] != "search":
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "search"
    ]
    takes_value = {
        o for a in sub._actions if a.nargs != 0 and a.option_strings for o in a.option_strings
    }
    out = argv[: at + 1]
    rest = argv[at + 1 :]
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "--":
            out += rest[i:]
            break
        if word in takes_value:
            out += rest[i : i + 2]
            i += 2
            continue
        if word.startswith("-") and not word.startswith("--"):
            word = _TERM_MARK + word
        out.append(word)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    _exact_stdout()
    argv = list(sys.argv[1:] if argv is None else argv)
    at = _command_index(argv)
    parser = build_parser(None if at is None else argv[at])
    argv = mark_search_terms(argv, parser)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `tagd search -hat --limit 5 1girl`: words after an option are query terms too.
        terms = [a for a in extra if not a.startswith("--")]
        if getattr(args, "query_terms_from_options", False) and terms == extra:
            args.query = [*args.query, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "query_terms_from_options", False):
        args.query = [w.removeprefix(_TERM_MARK) for w in args.query]
    setup_logging(args.verbose, args.quiet)
    ctx = Context(args)
    try:
        return int(args.func(ctx) or 0)
    except UserError as exc:
        print(f"tagd: {for_humans(str(exc), keep_newlines=True)}", file=sys.stderr)
        return exc.exit_code
    except UnknownModel as exc:
        print(f"tagd: {for_humans(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("tagd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except sqlite3.Error as exc:
        from tagd.index.dberrors import describe

        log.debug("database error", exc_info=True)
        print(f"tagd: {for_humans(describe(exc, _database_of(ctx)))}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:
        # The last resort: whatever escaped the commands is still one line, never a traceback.
        log.debug("unexpected error", exc_info=True)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no detail"
        print(
            f"tagd: unexpected error in `{args.command}`: {type(exc).__name__}: {detail} "
            "(rerun with -v for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    finally:
        ctx.close()


def _database_of(ctx: Context) -> str | None:
    try:
        return str(ctx.config.database)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
