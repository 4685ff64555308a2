"""Where model files come from: a Hugging Face repo (through its cache) or a local folder.

Errors are one line naming the model and what to do, never a traceback: a model that cannot
be found is the most common first-run problem.
"""

from __future__ import annotations

import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from tagd.config import ModelConfig
from tagd.tagging.families import Family

log = logging.getLogger(__name__)
_SHA1 = set("0123456789abcdef")
# huggingface_hub retries an unreachable Hub for ~25 s before giving up on a file that is not
# cached; a TCP connect with this bound answers "offline" first.
PROBE_TIMEOUT = 3.0


class ModelError(Exception):
    """A model cannot be fetched, loaded or used; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    model_path: Path
    label_path: Path
    revision: str
    # Optional files found beside the model (the family's config_file), by name.
    extras: dict[str, Path] = field(default_factory=dict)


def resolve(
    model: ModelConfig,
    family: Family,
    *,
    cache_dir: Path | None = None,
    offline: bool = False,
) -> ModelFiles:
    """Local paths of the model and label files, downloading into the HF cache if needed."""
    if model.path is not None:
        return _local(model, family)
    return _from_hub(model, family, cache_dir=cache_dir, offline=offline)


def _local(model: ModelConfig, family: Family) -> ModelFiles:
    folder = model.path
    assert folder is not None
    if not folder.is_dir():
        raise ModelError(
            f"model {model.name!r}: folder {folder} does not exist; fix `path:` or put "
            f"{family.model_file} and {family.label_file} there"
        )
    onnx_path, labels = folder / family.model_file, folder / family.label_file
    for p in (onnx_path, labels):
        if not p.exists():
            raise ModelError(
                f"model {model.name!r}: {p} is missing; the folder needs {family.model_file} "
                f"and {family.label_file} (the {family.name} layout)"
            )
        check_readable(model.name, p)
    extras = {}
    for extra in (family.config_file, family.thresholds_file):
        if extra and (folder / extra).is_file():
            extras[extra] = folder / extra
    return ModelFiles(
        onnx_path, labels, "sha256:" + _file_digest(model.name, onnx_path)[:16], extras
    )


def check_readable(name: str, path: Path) -> None:
    """A model file that exists but cannot be used: one line, not an error deep in a parser."""
    try:
        with open(path, "rb") as fh:
            empty = not fh.read(1)
    except OSError as exc:
        raise ModelError(
            f"model {name!r}: {path} cannot be read ({exc.strerror or exc}); it must be a "
            "readable file: fix its permissions or fetch it again"
        ) from None
    if empty:
        raise ModelError(
            f"model {name!r}: {path} is empty (0 bytes), an interrupted download or copy: "
            "delete it and fetch or copy it again"
        )


def _file_digest(name: str, path: Path) -> str:
    """The model file's SHA-256, remembered while the file is unchanged (tagd.modelcache)."""
    from tagd.tagging.modelcache import file_sha256

    try:
        return file_sha256(path)
    except OSError as exc:
        raise ModelError(
            f"model {name!r}: {path} cannot be read ({exc.strerror or exc}): fix its "
            "permissions or copy it again"
        ) from None


def _from_hub(
    model: ModelConfig, family: Family, *, cache_dir: Path | None, offline: bool
) -> ModelFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert model.repo is not None
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = f"model {model.name!r} ({model.repo}@{model.revision})"
    if not offline:
        from huggingface_hub import constants

        why = unreachable(constants.ENDPOINT, PROBE_TIMEOUT)
        if why is not None and not _cached(model, family, cache_dir):
            raise ModelError(
                f"{where}: not in the cache, and {constants.ENDPOINT} cannot be reached ({why}): "
                "run `tagd models pull` once with network access, or use `path:` with a local "
                "folder"
            )
        if why is not None:
            # Cached, hub down: the cache answers at once, where each optional file would
            # otherwise wait out huggingface_hub's retries (~20 s in all).
            log.info(
                "%s: %s cannot be reached (%s); using the cache", where, constants.ENDPOINT, why
            )
            offline = True
    paths: list[Path] = []
    extras: dict[str, Path] = {}
    # Optional: weights stored outside the graph (`model.onnx.data`, which ONNX Runtime finds
    # beside the graph), the family's preprocessing file and its thresholds file.
    optional = [
        f"{family.model_file}.data",
        *(f for f in (family.config_file, family.thresholds_file) if f),
    ]
    for filename in (family.model_file, family.label_file, *optional):
        try:
            local = hf_hub_download(
                model.repo,
                filename,
                revision=model.revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=offline,
            )
        except GatedRepoError:
            raise ModelError(gated_message(where, model.repo)) from None
        except RepositoryNotFoundError:
            raise ModelError(
                f"{where}: repository not found on Hugging Face; check `repo:` "
                "(private repos need HF_TOKEN)"
            ) from None
        except RevisionNotFoundError:
            raise ModelError(
                f"{where}: revision not found; check `revision:` (a branch, tag or commit sha)"
            ) from None
        except LocalEntryNotFoundError:
            if filename in optional:
                continue
            if offline:
                hint = "tagd is offline"
            else:
                hint = "it is not in the cache and Hugging Face could not be reached"
            raise ModelError(
                f"{where}: {filename} not available: {hint}; run `tagd models pull` once with "
                "network access, or use `path:` with a local folder"
            ) from None
        except EntryNotFoundError:
            if filename in optional:
                continue
            raise ModelError(
                f"{where}: the repo has no {filename}; is `family: {family.name}` right?"
            ) from None
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403):
                raise ModelError(gated_message(where, model.repo)) from None
            raise ModelError(
                f"{where}: download of {filename} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the network "
                "or use `path:` with a local folder"
            ) from None
        check_readable(model.name, Path(local))
        if filename in optional:
            extras[filename] = Path(local)
        else:
            paths.append(Path(local))
    snapshot = next(
        (p.name for p in paths[0].parents if p.parent.name == "snapshots"), paths[0].parent.name
    )
    revision = snapshot if len(snapshot) == 40 and set(snapshot) <= _SHA1 else model.revision
    return ModelFiles(paths[0], paths[1], revision, extras)


def gated_message(where: str, repo: str) -> str:
    """401/403 from the Hub: the repo is gated (or private) and this user has no access yet."""
    return (
        f"{where}: Hugging Face refused access (gated repository): accept its licence on "
        f"https://huggingface.co/{repo} while logged in, then give tagd your token "
        "(HF_TOKEN=hf_... in the environment, or `hf auth login` as the user tagd runs as)"
    )


def _cached(model: ModelConfig, family: Family, cache_dir: Path | None) -> bool:
    """Both files of the model's revision are in the HF cache (no network touched)."""
    from huggingface_hub import hf_hub_download

    assert model.repo is not None
    for filename in (family.model_file, family.label_file):
        try:
            hf_hub_download(
                model.repo,
                filename,
                revision=model.revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=True,
            )
        except Exception:
            return False
    return True


def unreachable(endpoint: str, timeout: float) -> str | None:
    """None when a TCP connection to `endpoint` opens within `timeout`, else the reason."""
    url = urllib.parse.urlsplit(endpoint)
    if not url.hostname:
        return f"not a URL: {endpoint!r}"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or str(exc)
