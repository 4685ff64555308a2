"""`tagd init`: a working, commented config from a few answers, so nobody starts from YAML.

The text is written by hand (not yaml.dump) so that it keeps comments, and parsed back with
tagd.config before it is saved: what `init` writes always loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from tagd import catalog
from tagd.config import ConfigError, default_config_path, default_database_path, parse

DEFAULT_MODEL = "wd-vit-tagger-v3"


class InitError(Exception):
    """An answer that cannot become a config (the message names the flag and the fix)."""


@dataclass(frozen=True)
class ModelChoice:
    name: str
    repo: str | None
    path: Path | None
    family: str


def example_text() -> str:
    """The fully commented example config shipped inside the package."""
    return resources.files("tagd").joinpath("config.example.yaml").read_text(encoding="utf-8")


def target_path(explicit: str | None) -> Path:
    """Where tagd looks first: --config, then $TAGD_CONFIG, then the XDG config dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("TAGD_CONFIG")
    return Path(env).expanduser() if env else default_config_path()


def is_default_location(path: Path) -> bool:
    """Whether plain `tagd` (no --config) will find a config at `path`."""
    env = os.environ.get("TAGD_CONFIG")
    first = Path(env).expanduser() if env else default_config_path()
    return path.resolve() == first.resolve()


def choose_model(word: str) -> ModelChoice:
    """A catalog shortcut, an existing model folder, or a Hugging Face `owner/name`."""
    text = word.strip()
    entry = catalog.lookup(text)
    if entry is not None:
        return ModelChoice(text.lower(), entry.repo, None, entry.family)
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "model.onnx").is_file() and not any(folder.glob("*.onnx")):
            raise InitError(f"--model {text}: the folder has no .onnx file")
        return ModelChoice(folder.resolve().name, None, folder.resolve(), "wd14")
    if text.count("/") == 1 and all(text.split("/")) and not text.startswith((".", "~")):
        return ModelChoice(text.split("/")[1].lower(), text, None, "wd14")
    known = ", ".join(catalog.CATALOG)
    raise InitError(
        f"--model {text}: not a known model, a folder or a Hugging Face 'owner/name' "
        f"(known: {known})"
    )


def render(
    watch: list[Path], model: ModelChoice, database: Path, device: str, provider: str
) -> str:
    """The config text; values are JSON strings, which YAML reads unchanged."""
    q = json.dumps
    roots = "\n".join(f"  - path: {q(str(p))}" for p in watch)
    if model.path is not None:
        source = f"    path: {q(str(model.path))}   # holds model.onnx and its label file"
    else:
        source = (
            f"    repo: {q(model.repo)}   # fetched into the Hugging Face cache\n"
            "    revision: main   # pin a commit for reproducible results"
        )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    return f"""# tagd configuration, written by `tagd init` on {stamp}.
# Every key is documented in the full example: `tagd config example`.
# Check it with `tagd check`. Relative paths are relative to this file.

# The SQLite index. Keep it on a local disk (SQLite's WAL mode does not work over NFS/SMB).
database: {q(str(database))}

# Gallery folders to index, recursively. Add `polling: true` to a root on NFS/SMB/sshfs.
watch:
{roots}

# Tagger models. `repo:` is a Hugging Face repo (or a shortcut: `tagd models --catalog`),
# `path:` a local folder. Thresholds default to general 0.35, character 0.85, rating top.
models:
  - name: {q(model.name)}
{source}
    family: {q(model.family)}

# auto: an NVIDIA GPU when one is usable, else the CPU. When this file was written the
# provider that ran was {provider}.
inference:
  device: {q(device)}
"""


def build(
    watch: list[str],
    model: str,
    database: str | None,
    target: Path,
    device: str,
    provider: Callable[[], str],
) -> str:
    """Validate the answers and return the config text (nothing is written here).

    `provider` is asked only once the answers are valid: it starts an ONNX Runtime session.
    """
    if not watch:
        raise InitError("--watch: give at least one gallery folder")
    roots = []
    for w in watch:
        p = Path(w).expanduser()
        if not p.is_dir():
            raise InitError(f"--watch {w}: no such folder; create it or fix the path")
        roots.append(p.resolve())
    choice = choose_model(model)
    db = Path(database).expanduser().absolute() if database else default_database_path()
    text = render(roots, choice, db, device, provider())
    import yaml

    try:
        parse(yaml.safe_load(text), base=target.parent.absolute(), source=target)
    except ConfigError as exc:
        raise InitError(f"the config would not load: {exc}") from None
    return text


def write(target: Path, text: str, *, force: bool) -> None:
    """Write atomically; never replace an existing file unless `force`."""
    if target.exists() and not force:
        raise InitError(f"{target} already exists: pass --force to replace it, or --config PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    from tagd.index.atomic import write_atomic

    data = text.encode("utf-8")
    write_atomic(target, lambda fh: fh.write(data), mode=0o644, durable=True)
