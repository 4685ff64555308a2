from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tagd import config as cfg


def test_example_config_is_valid_and_complete() -> None:
    path = Path(__file__).parent.parent / "tagd" / "config.example.yaml"
    conf = cfg.load(str(path))
    assert conf.database == Path("/var/lib/tagd/tagd.db")
    assert conf.models[0].repo == "SmilingWolf/wd-vit-tagger-v3"
    assert conf.watch[0].exclude == cfg.DEFAULT_EXCLUDES
    text = path.read_text()
    for key in cfg._TOP_KEYS + cfg._MODEL_KEYS + cfg._DAEMON_KEYS:
        assert f"{key}:" in text, f"config.example.yaml does not document {key}"


def test_smallest_config_from_the_issue(tmp_path: Path) -> None:
    data = yaml.safe_load(
        """
database: /var/lib/tagd/tagd.db
watch:
  - path: /srv/gallery
models:
  - name: wd-vit-tagger-v3
    repo: SmilingWolf/wd-vit-tagger-v3
    revision: main
  - name: my-tagger
    path: ./models/my-tagger
"""
    )
    conf = cfg.parse(data, base=tmp_path)
    assert conf.models[1].path == tmp_path / "models" / "my-tagger"
    assert conf.models[0].family == "wd14"
    assert conf.inference.device == "auto"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"modles": []}, "modles: unknown key; did you mean 'models'?"),
        ({"models": [{"name": "a"}]}, "models[0]: set exactly one of `repo:`"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "used twice"),
        ({"models": [{"name": "a", "path": "x", "thresholds": {"general": 3}}]}, "general"),
        ({"models": [{"name": "a", "path": "x", "thresholds": {"rating": "best"}}]}, "'top'"),
        ({"inference": {"device": "gpu"}}, "inference.device: 'gpu' is not one of"),
        ({"watch": [{"polling": True}]}, "watch[0].path: missing"),
        ({"watch": "/srv"}, "watch: expected a list"),
        ({"daemon": {"settle": 2}}, "daemon.settle: unknown key; did you mean 'settle_seconds'?"),
        ({"daemon": {"max_attempts": 0}}, "daemon.max_attempts: expected a whole number >= 1"),
        ({"daemon": {"reconcile_interval": 5}}, "daemon.reconcile_interval: expected a number"),
    ],
)
def test_errors_name_the_key_and_fix(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(cfg.ConfigError) as err:
        cfg.parse(data, base=tmp_path)
    assert message in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("models:\n  - name: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="line"):
        cfg.load(str(p))


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TAGD_CONFIG", raising=False)
    assert cfg.find_config("explicit.yaml") == Path("explicit.yaml")
    monkeypatch.setenv("TAGD_CONFIG", "/env.yaml")
    assert cfg.find_config(None) == Path("/env.yaml")
    monkeypatch.delenv("TAGD_CONFIG")
    xdg = tmp_path / "xdg" / "tagd" / "config.yaml"
    xdg.parent.mkdir(parents=True)
    xdg.write_text("{}")
    assert cfg.find_config(None) == xdg
