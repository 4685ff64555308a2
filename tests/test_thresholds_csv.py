"""The per-category `thresholds.csv` PixAI and animetimm repos ship: the model's own
namespace thresholds, between the family preset and the config's `thresholds:`; per-tag
`tags.thresholds` and animetimm's `best_threshold` still win; reindex decides as tagging did."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_tagd, write_config
from new_family_models import animetimm_folder, pixai_folder, write_thresholds_csv
from PIL import Image

from tagd.config import InferenceConfig, ModelConfig
from tagd.tagging import families, hub
from tagd.tagging.hub import ModelError
from tagd.tagging.tagger import Tagger


def _tagger(folder: Path, family: str, thresholds: dict | None = None) -> Tagger:
    fam = families.get(family)
    model = ModelConfig(name=family, path=folder, family=family, thresholds=thresholds or {})
    return Tagger(model, fam, hub.resolve(model, fam), InferenceConfig("cpu"))


def test_pixai_thresholds_csv_replaces_the_preset_and_the_config_wins(tmp_path: Path) -> None:
    folder = pixai_folder(tmp_path / "p")
    write_thresholds_csv(folder, [(0, "general", 0.2), (4, "character", 0.7)], metrics=False)
    assert _tagger(folder, "pixai").thresholds == {"general": 0.2, "character": 0.7}
    mine = _tagger(folder, "pixai", {"general": 0.45})
    assert mine.thresholds == {"general": 0.45, "character": 0.7}
    (folder / "thresholds.csv").unlink()
    assert _tagger(folder, "pixai").thresholds == {"general": 0.30, "character": 0.85}


def test_animetimm_csv_first_row_per_category_and_rating_stays_top1(tmp_path: Path) -> None:
    folder = animetimm_folder(tmp_path / "a")
    rows = [(0, "general", 0.33), (0, "general", 0.9), (4, "character", 0.6), (9, "rating", 0.5)]
    write_thresholds_csv(folder, rows, metrics=True)
    t = _tagger(folder, "animetimm")
    assert t.thresholds == {"default": 0.4, "rating": "top", "general": 0.33, "character": 0.6}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("category,name,threshold\n0,general,high\n", "thresholds.csv line 2: threshold is not"),
        ("category,name,threshold\n0,general,1.5\n", "thresholds.csv line 2: threshold 1.5"),
        ("tag,value\ng0,0.3\n", "thresholds.csv: expected a header with category, name and"),
    ],
)
def test_a_bad_thresholds_csv_is_one_line_naming_file_and_line(
    tmp_path: Path, text: str, words: str
) -> None:
    folder = pixai_folder(tmp_path / "p")
    (folder / "thresholds.csv").write_text(text)
    with pytest.raises(ModelError) as err:
        _tagger(folder, "pixai")
    assert words in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("model 'pixai': ")


@pytest.mark.slow
def test_scan_and_reindex_select_with_the_shipped_thresholds(tmp_path: Path) -> None:
    """Red gives the probe g0 0.73, g1 and g2 0.27, c0 0.73: the preset (0.30/0.85) selects
    g0 only; thresholds.csv (0.2/0.7) selects g1 and c0 too; `tags.thresholds` g2: 0.5
    takes g2 back out; reindex keeps all of that."""
    gallery = tmp_path / "g"
    gallery.mkdir()
    red = gallery / "red.png"
    Image.new("RGB", (200, 100), (255, 0, 0)).save(red)
    folder = pixai_folder(tmp_path / "p")
    write_thresholds_csv(folder, [(0, "general", 0.2), (4, "character", 0.7)], metrics=False)
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "database": str(tmp_path / "t.db"),
            "watch": [{"path": str(gallery)}],
            "models": [{"name": "px", "path": str(folder), "family": "pixai"}],
            "inference": {"device": "cpu"},
            "tags": {"thresholds": {"g2": 0.5}},
        },
    )

    def found(query: str) -> list[str]:
        r = run_tagd("-c", str(cfg), "search", query)
        assert r.returncode in (0, 1) and not r.stderr.strip(), r.stderr  # 1: nothing found
        return r.stdout.split()

    scan = run_tagd("-c", str(cfg), "scan")
    assert scan.returncode == 0, scan.stderr
    for _ in range(2):
        assert found("g0") == [str(red)] and found("g1") == [str(red)]
        assert found("character:c0") == [str(red)]
        assert found("g2") == []
        r = run_tagd("-c", str(cfg), "reindex", "--no-progress")
        assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_hub_repo_thresholds_csv_is_fetched_and_used_offline(tmp_path: Path) -> None:
    from hf_server import HubServer

    repo = pixai_folder(tmp_path / "repo")
    write_thresholds_csv(repo, [(0, "general", 0.2), (4, "character", 0.7)], metrics=False)
    cache = tmp_path / "hf"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    entry = {"name": "px", "repo": "deepghs/pixai", "family": "pixai"}
    online = write_config(tmp_path / "on.yaml", {"hf_cache": str(cache), "models": [entry]})
    with HubServer({"deepghs/pixai": repo}, commit) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1"}
        r = run_tagd("-c", str(online), "models", "pull", "px", env=env)
        assert r.returncode == 0, r.stderr
    snapshot = cache / "models--deepghs--pixai" / "snapshots" / commit
    assert (snapshot / "thresholds.csv").is_file()
    fam = families.get("pixai")
    model = ModelConfig(name="px", repo="deepghs/pixai", family="pixai")
    files = hub.resolve(model, fam, cache_dir=cache, offline=True)
    assert files.extras["thresholds.csv"].parent == snapshot
    tagger = Tagger(model, fam, files, InferenceConfig("cpu"))
    assert tagger.thresholds == {"general": 0.2, "character": 0.7}
