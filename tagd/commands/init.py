"""`tagd init`: write a working config from flags, or by asking on a terminal."""

from __future__ import annotations

import argparse
import sys

from tagd.commands import Context, UserError

EPILOG = """examples:
  tagd init --watch ~/Pictures/gallery --model wd-vit-tagger-v3
  tagd init --watch /srv/a --watch /srv/b --model /models/my-tagger --config ./tagd.yaml
  tagd init            (on a terminal: asks the same questions)
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init",
        help="write a starter config",
        description="Write a working, commented config: the gallery folders to watch, one "
        "model, the database. Without flags on a terminal it asks; the file is checked by "
        "loading it before it is written, and never replaces an existing one without --force.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--watch", action="append", metavar="DIR", help="a gallery folder (repeatable)")
    p.add_argument(
        "--model",
        metavar="NAME|PATH",
        help="a shortcut (`tagd models --catalog`), a folder "
        "with model.onnx, or a Hugging Face owner/name",
    )
    p.add_argument("--database", metavar="PATH", help="the index file (default: the XDG data dir)")
    p.add_argument(
        "--config",
        dest="init_config",
        metavar="PATH",
        help="where to write (default: $TAGD_CONFIG, else ~/.config/tagd/config.yaml)",
    )
    from tagd.vocab import DEVICES

    p.add_argument("--device", choices=DEVICES, default="auto", help="inference.device")
    p.add_argument("--force", action="store_true", help="replace an existing config")
    p.set_defaults(func=run)


def _ask(question: str, default: str | None = None) -> str:
    shown = f" [{default}]" if default else ""
    answer = input(f"{question}{shown}: ").strip()
    return answer or (default or "")


def _interactive(args: argparse.Namespace) -> None:
    from tagd.config import default_database_path
    from tagd.initconfig import DEFAULT_MODEL

    print("tagd init: a few questions; Enter keeps the default in brackets.")
    roots = _ask("Gallery folder(s) to watch, separated by commas")
    args.watch = [r.strip() for r in roots.split(",") if r.strip()]
    args.model = _ask("Model (a shortcut, a folder, or owner/name)", DEFAULT_MODEL)
    args.database = _ask("Database file", str(default_database_path()))


def run(ctx: Context) -> int:
    from tagd.doctor import probe_provider
    from tagd.initconfig import InitError, build, is_default_location, target_path, write

    args = ctx.args
    if not args.watch and not args.model:
        if not sys.stdin.isatty():
            raise UserError(
                "init: no terminal to ask on: pass --watch DIR and --model NAME|PATH "
                "(see `tagd init --help`)",
                2,
            )
        try:
            _interactive(args)
        except EOFError:
            raise UserError("init: input ended before every question was answered", 2) from None
    if not args.watch or not args.model:
        missing = "--watch DIR" if not args.watch else "--model NAME|PATH"
        raise UserError(f"init: {missing} is needed too (see `tagd init --help`)", 2)
    target = target_path(args.init_config or args.config)
    from tagd.config import InferenceConfig

    seen: list[str] = []

    def provider() -> str:
        try:
            seen.append(probe_provider(InferenceConfig(device=args.device)))
        except Exception as exc:
            raise UserError(f"init: ONNX Runtime cannot start a session here ({exc})", 3) from None
        return seen[0]

    if target.exists() and not args.force:
        raise UserError(f"init: {target} already exists: pass --force to replace it", 2)
    try:
        text = build(args.watch, args.model, args.database, target, args.device, provider)
        write(target, text, force=args.force)
    except InitError as exc:
        raise UserError(f"init: {exc}", 2) from None
    provider_name = seen[0]
    from tagd.config import ConfigError, load

    try:
        load(str(target)).database.parent.mkdir(parents=True, exist_ok=True)
    except (ConfigError, OSError) as exc:
        msg = f"init: wrote {target} but cannot create the database folder: {exc}"
        raise UserError(msg, 3) from None
    cpu = provider_name == "CPUExecutionProvider"
    gpu = "the CPU (no usable GPU found)" if cpu else "a GPU"
    print(f"wrote {target.absolute()}")
    print(f"inference will run on {gpu}: {provider_name}")
    flag = "" if is_default_location(target) else f"--config {target} "
    print("next:")
    print(f"  tagd {flag}check          # is everything in place?")
    print(f"  tagd {flag}scan           # tag every image once")
    print(f"  tagd {flag}search 1girl   # find images by tag")
    return 0
