from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# Test the checkout the tests live in (also in tagd subprocesses), not another installed copy.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)

from onnx_models import build_wd_folder  # noqa: E402


@pytest.fixture(autouse=True)
def no_leftover_processes() -> object:
    """A test must stop every decode worker it started: a live child at exit kept the
    interpreter waiting in multiprocessing's exit handler and stalled CI (#8 item 21)."""
    yield
    left = multiprocessing.active_children()
    for proc in left:
        proc.kill()
        proc.join(5)
    assert not left, f"the test left processes running: {left}"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the forkserver the decode pools used, so the interpreter exits at once."""
    from multiprocessing import forkserver

    stop = getattr(forkserver._forkserver, "_stop", None)
    if stop is not None:
        stop()


@pytest.fixture(scope="session")
def probe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local WD-layout model folder (dynamic batch, v3 names)."""
    return build_wd_folder(tmp_path_factory.mktemp("models") / "probe")


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def gallery(tmp_path: Path) -> Path:
    g = tmp_path / "gallery"
    g.mkdir()
    return g


@pytest.fixture
def config_file(tmp_path: Path, gallery: Path, probe_model: Path) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        {
            "database": str(tmp_path / "state" / "tagd.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "probe", "path": str(probe_model)}],
            "inference": {"device": "cpu"},
        },
    )


def save(path: Path, color: tuple[int, ...], size: tuple[int, int] = (64, 48), **kw) -> Path:
    mode = "RGBA" if len(color) == 4 else "RGB"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    return path


def run_tagd(*args: str, env: dict[str, str] | None = None, input: str | None = None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("TAGD_CONFIG", None) if env is None or "TAGD_CONFIG" not in env else None
    return subprocess.run(
        [sys.executable, "-m", "tagd", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=input,
        timeout=120,
    )


def wait_for(cond: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll `cond` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {cond}")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory: pytest.TempPathFactory):
    """Model start caches of the tests (and their tagd subprocesses) never touch ~/.cache."""
    old = os.environ.get("TAGD_MODEL_CACHE")
    os.environ["TAGD_MODEL_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TAGD_MODEL_CACHE", None)
        else:
            os.environ["TAGD_MODEL_CACHE"] = old
