"""Where model files come from: a Hugging Face repo (through its cache) or a local folder.

Errors are one line naming the model and what to do, never a traceback: a model that cannot
be found is the most common first-run problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tagd.config import ModelConfig
from tagd.families import Family

_SHA1 = set("0123456789abcdef")


class ModelError(Exception):
    """A model cannot be fetched, loaded or used; the message says what to do."""


@dataclass(frozen=True)
class ModelFiles:
    model_path: Path
    label_path: Path
    revision: str


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
        if not p.is_file():
            raise ModelError(
                f"model {model.name!r}: {p} is missing; the folder needs {family.model_file} "
                f"and {family.label_file} (the {family.name} layout)"
            )
    from tagd.modelcache import file_sha256

    return ModelFiles(onnx_path, labels, "sha256:" + file_sha256(onnx_path)[:16])


def _from_hub(
    model: ModelConfig, family: Family, *, cache_dir: Path | None, offline: bool
) -> ModelFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    assert model.repo is not None
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    where = f"model {model.name!r} ({model.repo}@{model.revision})"
    paths: list[Path] = []
    for filename in (family.model_file, family.label_file):
        try:
            local = hf_hub_download(
                model.repo,
                filename,
                revision=model.revision,
                cache_dir=str(cache_dir) if cache_dir else None,
                local_files_only=offline,
            )
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
            if offline:
                hint = "tagd is offline: run `tagd models pull` once with network access"
            else:
                hint = "it is not in the cache and Hugging Face could not be reached"
            raise ModelError(
                f"{where}: {filename} not available: {hint}, or use `path:` with a local folder"
            ) from None
        except EntryNotFoundError:
            raise ModelError(
                f"{where}: the repo has no {filename}; is `family: {family.name}` right?"
            ) from None
        except Exception as exc:
            raise ModelError(
                f"{where}: download of {filename} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); check the network "
                "or use `path:` with a local folder"
            ) from None
        paths.append(Path(local))
    snapshot = paths[0].parent.name
    revision = snapshot if len(snapshot) == 40 and set(snapshot) <= _SHA1 else model.revision
    return ModelFiles(paths[0], paths[1], revision)
