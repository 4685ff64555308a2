"""Model resolution through the real huggingface_hub code, against a cache the test builds."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import run_tagd, save, write_config

from tagd.config import ModelConfig
from tagd.tagging.families import WD14
from tagd.tagging.hub import ModelError, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hf_cache(tmp_path: Path, probe_model: Path) -> Path:
    from onnx_models import build_hf_cache

    cache = tmp_path / "hf"
    build_hf_cache(cache, "acme/wd-probe-tagger-v3", probe_model, commit=COMMIT)
    return cache


def _model(**kw: object) -> ModelConfig:
    return ModelConfig(name="probe", repo="acme/wd-probe-tagger-v3", **kw)  # type: ignore[arg-type]


def test_pinned_commit_resolves_from_cache_without_network(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    files = resolve(_model(revision=COMMIT), WD14, cache_dir=hf_cache)
    # the hub being down costs one refused connect, not huggingface_hub's retries per file
    assert time.monotonic() - started < 5
    assert files.revision == COMMIT
    assert files.model_path.name == "model.onnx" and files.model_path.is_file()
    assert files.label_path.read_text().startswith("tag_id,name,category,count")


def test_branch_offline_resolves_through_refs(hf_cache: Path) -> None:
    files = resolve(_model(revision="main"), WD14, cache_dir=hf_cache, offline=True)
    assert files.revision == COMMIT


def test_uncached_revision_offline_is_clear(hf_cache: Path) -> None:
    with pytest.raises(ModelError) as err:
        resolve(_model(revision=OTHER), WD14, cache_dir=hf_cache, offline=True)
    msg = str(err.value)
    assert "model 'probe'" in msg and "offline" in msg and "tagd models pull" in msg
    assert "\n" not in msg


def test_unreachable_hub_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9", raising=False)
    monkeypatch.setattr(
        c,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}",
        raising=False,
    )
    with pytest.raises(ModelError) as err:
        resolve(_model(revision="main"), WD14, cache_dir=tmp_path / "empty")
    assert "model 'probe'" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_in_local_folder(tmp_path: Path, probe_model: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(probe_model, folder)
    (folder / "selected_tags.csv").unlink()
    with pytest.raises(ModelError, match="selected_tags.csv is missing"):
        resolve(ModelConfig(name="m", path=folder), WD14)


def test_scan_with_hub_model_end_to_end(tmp_path: Path, gallery: Path, hf_cache: Path) -> None:
    red = save(gallery / "r.png", (255, 0, 0))
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [str(gallery)],
            "hf_cache": str(hf_cache),
            "offline": True,
            "models": [{"name": "wd", "repo": "acme/wd-probe-tagger-v3", "revision": "main"}],
        },
    )
    r = run_tagd("-c", str(cfg), "scan")
    assert r.returncode == 0, r.stderr
    assert COMMIT in r.stderr
    assert run_tagd("-c", str(cfg), "search", "red").stdout.split() == [str(red)]

    missing = write_config(
        tmp_path / "m.yaml",
        {
            "database": str(tmp_path / "t2.db"),
            "watch": [str(gallery)],
            "hf_cache": str(tmp_path / "nothing"),
            "offline": True,
            "models": [{"name": "wd", "repo": "acme/other", "revision": OTHER}],
        },
    )
    r = run_tagd("-c", str(missing), "scan")
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and "model 'wd'" in r.stderr


def test_models_pull_downloads_through_the_hub_api(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    """`tagd models pull` fetches over HTTP into an empty cache; later runs work offline."""
    from hf_server import HubServer

    red = save(gallery / "r.png", (255, 0, 0))
    base = {"database": str(tmp_path / "t.db"), "watch": [str(gallery)]}
    model = {"name": "wd", "repo": "acme/wd-probe-tagger-v3", "revision": "main"}
    cache = tmp_path / "hf"
    online = write_config(tmp_path / "on.yaml", {**base, "hf_cache": str(cache), "models": [model]})
    with HubServer({"acme/wd-probe-tagger-v3": probe_model}, COMMIT) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"}
        r = run_tagd("-c", str(online), "models", "pull", "wd", env=env)
        assert r.returncode == 0, r.stderr
        fetched = {p.rsplit("/", 1)[-1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}
        assert fetched == {"model.onnx", "selected_tags.csv"}, hub.requests
        missing = write_config(
            tmp_path / "missing.yaml",
            {**base, "hf_cache": str(cache), "models": [{**model, "repo": "acme/nothing"}]},
        )
        r = run_tagd("-c", str(missing), "models", "pull", "wd", env=env)
        assert r.returncode != 0 and "repository not found" in r.stderr
        assert "Traceback" not in r.stderr
    snapshot = cache / "models--acme--wd-probe-tagger-v3" / "snapshots" / COMMIT
    assert (snapshot / "model.onnx").read_bytes() == (probe_model / "model.onnx").read_bytes()
    offline = write_config(
        tmp_path / "off.yaml",
        {**base, "hf_cache": str(cache), "offline": True, "models": [model]},
    )
    r = run_tagd("-c", str(offline), "scan")
    assert r.returncode == 0, r.stderr
    assert run_tagd("-c", str(offline), "search", "red").stdout.split() == [str(red)]
