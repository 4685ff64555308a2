"""`tagd tag FILES…`: tag files now, without the daemon; `path<TAB>tag<TAB>score` lines."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tagd.commands import Context, UserError

if TYPE_CHECKING:
    from tagd.config import Config, ModelConfig

EPILOG = """examples:
  tagd tag --model wd-vit-tagger-v3 a.jpg b.png
  find ~/pics -name '*.jpg' | tagd tag --pipe --model wd-vit-tagger-v3 --threshold 0.5
  tagd tag --model /models/my-tagger --cpu --format json img.webp   # a model folder, no config
  tagd tag --model wd-vit-tagger-v3 --store new/*.jpg               # also record in the index
  tagd tag --model wd --provider-options device_id=1,gpu_mem_limit=4294967296 x.jpg

output: one `path<TAB>tag<TAB>score` line per selected tag (namespaced tags as rating:general,
character:name), or one JSON object per file with --format json. Files that cannot be read
are reported on stderr; the exit code is then 1.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tag",
        help="tag files now (no daemon), for scripts",
        description="Tag image files with one model and print the selected tags, using the "
        "same decoding, preprocessing and thresholds as the daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("files", nargs="*", help="image files")
    p.add_argument("--pipe", action="store_true", help="also read paths from stdin, one a line")
    p.add_argument("--model", "-m", required=True, help="a configured model name or a folder")
    p.add_argument("--threshold", type=float, help="one threshold for all but the rating")
    p.add_argument("--batch", type=int, help="images per inference batch")
    p.add_argument("--cpu", action="store_true", help="never use the GPU")
    p.add_argument(
        "--provider-options",
        default="",
        metavar="K=V,…",
        help="extra CUDA execution provider options",
    )
    p.add_argument("--format", choices=("tsv", "json"), default="tsv")
    p.add_argument("--store", action="store_true", help="also record results in the index")
    p.set_defaults(func=run)


def _config(ctx: Context) -> Config:
    from tagd.config import Config, default_database_path

    try:
        return ctx.config
    except UserError:
        if Path(ctx.args.model).is_dir():
            return Config(database=default_database_path())
        raise


def _model(ctx: Context, config: Config) -> ModelConfig:
    from tagd.config import ConfigError, ModelConfig

    name = ctx.args.model
    if any(m.name == name for m in config.models):
        return config.model(name)
    folder = Path(name)
    if folder.is_dir():
        return ModelConfig(name=folder.resolve().name, path=folder.resolve())
    try:
        return config.model(name)
    except ConfigError as exc:
        raise UserError(f"{exc}; or pass a model folder", 2) from None


def _label(ns: str, name: str) -> str:
    return name if ns == "general" else f"{ns}:{name}"


def run(ctx: Context) -> int:
    import dataclasses

    from tagd.names import for_humans, json_path, tsv_field
    from tagd.tagging.hub import ModelError
    from tagd.tagging.oneshot import parse_provider_options, rules_with, tag_paths
    from tagd.tagging.sizing import worker_memory
    from tagd.tagging.tagger import load

    a = ctx.args
    if a.threshold is not None and not 0 <= a.threshold <= 1:
        raise UserError("--threshold: expected a number from 0 to 1", 2)
    if a.batch is not None and a.batch < 1:
        raise UserError("--batch: expected a whole number >= 1", 2)
    if not a.files and not a.pipe:
        raise UserError("no files: give paths, or --pipe to read them from stdin", 2)
    try:
        options = parse_provider_options(a.provider_options)
    except ValueError as exc:
        raise UserError(str(exc), 2) from None
    config = _config(ctx)
    model = _model(ctx, config)
    inference = dataclasses.replace(
        config.inference,
        device="cpu" if a.cpu else config.inference.device,
        provider_options=options,
    )
    config = dataclasses.replace(config, inference=inference)
    try:
        tagger = load(config, model)
    except ModelError as exc:
        raise UserError(str(exc), 3) from None
    paths = list(a.files)
    stdin_paths = (line.rstrip("\n") for line in sys.stdin) if a.pipe else iter(())
    all_paths = (os.path.abspath(p) for p in [*paths, *stdin_paths] if p)
    conn = ctx.db() if a.store else None
    failed = 0
    out = sys.stdout
    for r in tag_paths(
        tagger,
        all_paths,
        rules=rules_with(tagger.thresholds, a.threshold),
        batch_size=a.batch or model.batch_size or config.inference.batch_size or 8,
        max_pixels=config.max_image_pixels,
        conn=conn,
        floor=config.floor_for(model),
        memory_budget=worker_memory(config.inference, 1),
        max_file_bytes=config.inference.max_file_mb << 20,
        tag_rules=config.tags,
    ):
        if r.error is not None:
            failed += 1
            print(f"tagd: {for_humans(r.path)}: {for_humans(r.error)}", file=sys.stderr)
            continue
        if a.format == "json":
            record = {
                **json_path(r.path),
                "sha256": r.sha256,
                "tags": {_label(ns, n): round(s, 4) for ns, n, s in r.tags},
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            path = tsv_field(r.path)
            out.writelines(f"{path}\t{_label(ns, n)}\t{s:.4f}\n" for ns, n, s in r.tags)
        out.flush()
    return 1 if failed else 0
