"""`tagd models`: configured and downloaded models, tag counts, files tagged; `pull` pre-fetches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tagd.commands import Context, UserError
from tagd.index import inventory


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list models (configured, downloaded, catalog) or pre-fetch them",
        description="List configured models with their download state, tag count and how many "
        "files each has tagged, plus tagger repos found in the Hugging Face cache. "
        "`tagd models pull [NAME...]` downloads configured models now (all if none named).",
        epilog="examples: tagd models; tagd models pull wd-eva02-large-tagger-v3; "
        "tagd models --catalog",
    )
    p.add_argument("action", nargs="?", choices=("list", "pull"), default="list")
    p.add_argument("names", nargs="*", help="models to pull (default: every enabled model)")
    p.add_argument("--catalog", action="store_true", help="list the one-word repo shortcuts")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    if ctx.args.catalog:
        from tagd.catalog import CATALOG

        for word, entry in CATALOG.items():
            print(f"{word:<30} {entry.repo:<42} {entry.family:<6} {entry.note}")
        return 0
    if ctx.args.action == "pull":
        return _pull(ctx)
    return _list(ctx)


def _cached(ctx: Context, repo: str, filename: str, revision: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    cache = ctx.config.hf_cache
    found = try_to_load_from_cache(
        repo, filename, revision=revision, cache_dir=str(cache) if cache else None
    )
    return found if isinstance(found, str) else None


def _list(ctx: Context) -> int:
    from tagd.tagging import families

    config = ctx.config
    counts: dict[str, tuple[int | None, int]] = {}
    if Path(config.database).exists():
        conn = ctx.db(readonly=True)
        for name, (n_tags, files, _) in inventory.models_summary(conn).items():
            counts[name] = (n_tags, files)
    rows = []
    for m in config.models:
        family = families.get(m.family, config.families)
        if m.path is not None:
            present = (m.path / family.model_file).is_file()
        else:
            assert m.repo is not None
            present = _cached(ctx, m.repo, family.model_file, m.revision) is not None
        n_tags, files = counts.get(m.name, (None, 0))
        rows.append(
            {
                "name": m.name,
                "source": m.source,
                "family": m.family,
                "enabled": m.enabled,
                "downloaded": present,
                "tags": n_tags,
                "files_tagged": files,
            }
        )
    configured = {m.repo for m in config.models if m.repo}
    for repo in _cached_taggers(ctx):
        if repo not in configured:
            rows.append(
                {
                    "name": None,
                    "source": repo,
                    "family": None,
                    "enabled": False,
                    "downloaded": True,
                    "tags": None,
                    "files_tagged": 0,
                }
            )
    if ctx.args.format == "json":
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{'NAME':<28} {'FAMILY':<13} {'TAGS':>6} {'FILES':>8}  STATE       SOURCE")
    for r in rows:
        state = "downloaded" if r["downloaded"] else "not fetched"
        if r["name"] is None:
            state = "cached only"
        elif not r["enabled"]:
            state += ",off"
        print(
            f"{r['name'] or '-':<28} {r['family'] or '-':<13} {r['tags'] or '-':>6} "
            f"{r['files_tagged']:>8}  {state:<11} {r['source']}"
        )
    return 0


def _cached_taggers(ctx: Context) -> list[str]:
    """Repos in the HF cache that hold a model.onnx (any tagger, configured or not)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    cache = ctx.config.hf_cache
    try:
        info = scan_cache_dir(str(cache) if cache else None)
    except (CacheNotFound, OSError):
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        if any(f.file_name == "model.onnx" for rev in repo.revisions for f in rev.files):
            out.append(repo.repo_id)
    return sorted(out)


def _pull(ctx: Context) -> int:
    from tagd.tagging import families, hub

    config = ctx.config
    names = ctx.args.names or [m.name for m in config.models if m.enabled]
    failed = 0
    for name in names:
        try:
            m = config.model(name)
        except Exception as exc:
            raise UserError(str(exc), 2) from None
        family = families.get(m.family, config.families)
        try:
            files = hub.resolve(m, family, cache_dir=config.hf_cache, offline=False)
        except hub.ModelError as exc:
            print(f"tagd: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{m.name}: {files.model_path} ({files.revision})")
    if failed:
        raise UserError(f"{failed} of {len(names)} models could not be fetched", 3)
    return 0
