"""Tag implications, per-tag thresholds and Danbooru rule imports (#13): the decision in
isolation, then through `tagd scan` and `tagd reindex` on a real index."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_tagd, save, write_config

from tagd import config as config_mod
from tagd.config import TagRules
from tagd.tagging import results, tagrules

NAMES = ("cat_ears", "blush", "smile", "miku", "other_girl", "general", "explicit")
NS = ("general", "general", "general", "character", "character", "rating", "rating")


def _decide(scores: list[float], rules: TagRules, thresholds=None, model=None):  # type: ignore[no-untyped-def]
    th = thresholds or {"general": 0.35, "character": 0.85, "rating": "top"}
    r = results.resolve_rules(NAMES, NS, rules, model)
    selected, targets = results.decide(np.asarray(scores, np.float32), th, r)
    return {NAMES[i] for i in np.flatnonzero(selected)}, targets


def test_per_tag_thresholds_exact_then_name_then_glob_then_model() -> None:
    scores = [0.5, 0.5, 0.5, 0.88, 0.95, 0.9, 0.1]
    chosen, _ = _decide(scores, TagRules())
    assert chosen == {"cat_ears", "blush", "smile", "miku", "other_girl", "general"}
    rules = TagRules(thresholds={"blush": 0.6, "character:*": 0.9, "general:smile": 0.45})
    chosen, _ = _decide(scores, rules)
    assert chosen == {"cat_ears", "smile", "other_girl", "general"}
    # The model's own per-tag threshold applies where the config sets none; NaN = none.
    model = [0.55, float("nan"), 0.2, float("nan"), float("nan"), 0.99, 0.99]
    chosen, _ = _decide(scores, TagRules(thresholds={"smile": 0.7}), model=model)
    assert "cat_ears" not in chosen and "smile" not in chosen and "blush" in chosen
    # A top-1 group keeps exactly one tag whatever per-tag thresholds say.
    assert "general" in chosen and "explicit" not in chosen


def test_implications_are_transitive_use_the_implying_score_and_survive_cycles() -> None:
    rules = TagRules(
        implications={
            "cat_ears": "animal_ears",
            "animal_ears": ("ears", "general:cat_ears"),
            "character:miku": "copyright:vocaloid",
            "blush": "animal_ears",
        }
    )
    chosen, targets = _decide([0.6, 0.9, 0.1, 0.95, 0.0, 0.9, 0.0], rules)
    assert "cat_ears" in chosen
    assert targets[("general", "animal_ears")] == pytest.approx(0.9)  # best implying score
    assert targets[("general", "ears")] == pytest.approx(0.9)
    assert targets[("copyright", "vocaloid")] == pytest.approx(0.95)
    assert ("general", "cat_ears") not in targets or targets[("general", "cat_ears")] >= 0.6
    _, none = _decide([0.1, 0.1, 0.1, 0.1, 0.0, 0.9, 0.0], rules)
    assert none == {}


def test_aliased_tags_imply_through_their_target() -> None:
    rules = TagRules(aliases={"blush": "flushed"}, implications={"flushed": "emotion"})
    chosen, targets = _decide([0.0, 0.8, 0.0, 0.0, 0.0, 0.9, 0.0], rules)
    assert "blush" not in chosen
    assert targets == {
        ("general", "flushed"): pytest.approx(0.8),
        ("general", "emotion"): pytest.approx(0.8),
    }


def test_config_keys_are_validated(tmp_path: Path) -> None:
    good = config_mod.parse(
        {"tags": {"implications": {"a": ["b", "c"]}, "thresholds": {"x": 0.6}}}, base=tmp_path
    )
    assert good.tags.implications == {"a": ("b", "c")} and good.tags.thresholds == {"x": 0.6}
    with pytest.raises(config_mod.ConfigError, match=r"tags.thresholds.x: "):
        config_mod.parse({"tags": {"thresholds": {"x": 1.5}}}, base=tmp_path)
    with pytest.raises(config_mod.ConfigError, match=r"tags.implications.a: expected a tag"):
        config_mod.parse({"tags": {"implications": {"a": 3}}}, base=tmp_path)


def test_danbooru_exports_are_parsed_active_only(tmp_path: Path) -> None:
    j = tmp_path / "tag_implications.json"
    j.write_text(
        json.dumps(
            [
                {
                    "id": 1,
                    "antecedent_name": "cat_ears",
                    "consequent_name": "animal_ears",
                    "status": "active",
                },
                {"id": 2, "antecedent_name": "x", "consequent_name": "y", "status": "deleted"},
            ]
        )
    )
    parsed = tagrules.parse(j)
    assert (parsed.kind, parsed.pairs, parsed.inactive) == (
        "implication",
        [("cat_ears", "animal_ears")],
        1,
    )
    c = tmp_path / "export.csv"
    c.write_text("id,antecedent_name,consequent_name,status\n1,kitty,cat,active\n2,a,b,pending\n")
    with pytest.raises(tagrules.RulesFileError, match="add --kind aliases"):
        tagrules.parse(c)
    assert tagrules.parse(c, "alias").pairs == [("kitty", "cat")]
    bad = tmp_path / "tag_aliases.csv"
    bad.write_text("from,to\na,b\n")
    with pytest.raises(tagrules.RulesFileError, match="antecedent_name and consequent_name"):
        tagrules.parse(bad)


def _selected(db: Path, path: Path) -> dict[str, float]:
    with sqlite3.connect(db) as conn:
        return {
            f"{r[0]}:{r[1]}": r[2]
            for r in conn.execute(
                """SELECT t.namespace, t.name, s.score FROM scores s
                   JOIN tags t ON t.id = s.tag_id JOIN paths p ON p.file_id = s.file_id
                   WHERE p.path = ? AND s.selected = 1""",
                (str(path),),
            )
        }


@pytest.mark.slow
def test_implications_thresholds_and_imports_through_scan_and_reindex(
    tmp_path: Path, gallery: Path, probe_model: Path
) -> None:
    red = save(gallery / "red.png", (255, 0, 0), (300, 100))
    db = tmp_path / "tagd.db"
    data = {
        "database": str(db),
        "watch": [str(gallery)],
        "models": [{"name": "probe", "path": str(probe_model)}],
        "inference": {"device": "cpu"},
        "tags": {
            "implications": {"red": "warm_colour", "warm_colour": "colour"},
            "thresholds": {"character:*": 0.9999999},
        },
    }
    conf = write_config(tmp_path / "c.yaml", data)
    r = run_tagd("-c", str(conf), "scan")
    assert r.returncode == 0, r.stderr
    tags = _selected(db, red)
    assert tags["general:warm_colour"] == pytest.approx(tags["general:red"])
    assert tags["general:colour"] == pytest.approx(tags["general:red"])
    assert "character:crimson_knight" not in tags  # 0.9998 < the per-tag 0.9999999

    data["tags"] = {"thresholds": {"character:*": 0.5}}
    conf.write_text(yaml.safe_dump(data))
    rules = tmp_path / "tag_implications.csv"
    rules.write_text(
        "id,antecedent_name,consequent_name,status\n"
        "1,crimson_knight,knight,active\n2,red,not_this,deleted\n"
    )
    r = run_tagd("-c", str(conf), "tags", "import-rules", str(rules))
    assert r.returncode == 0, r.stderr
    assert "imported 1 implication rules" in r.stdout and "1 inactive" in r.stdout
    r = run_tagd("-c", str(conf), "reindex")
    assert r.returncode == 0, r.stderr
    tags = _selected(db, red)
    assert "general:warm_colour" not in tags and "general:not_this" not in tags
    assert "character:crimson_knight" in tags
    assert tags["character:knight"] == pytest.approx(tags["character:crimson_knight"])
    found = run_tagd("-c", str(conf), "search", "character:knight")
    assert found.stdout.split() == [str(red)]
    bad = run_tagd("-c", str(conf), "tags", "import-rules", str(tmp_path / "nothing.json"))
    assert bad.returncode == 2 and "cannot" in bad.stderr and "Traceback" not in bad.stderr
