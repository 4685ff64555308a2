"""Unknown tags, namespaces and ratings are named with a suggestion (issue #9, honest answers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import run_tagd, write_config
from test_search_semantics import build_index

from tagd.index.db import connect
from tagd.search.query import And, Not, Or, Tag, parse
from tagd.search.suggest import unknown_tags


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("suggest")
    idx = build_index(tmp)
    cfg = write_config(
        tmp / "config.yaml",
        {"database": str(idx.db), "watch": [str(tmp)], "models": [{"name": "wd", "path": "."}]},
    )
    return idx.db, cfg


def messages(db: Path, query: str) -> list[str]:
    conn = connect(db, readonly=True)
    try:
        return [u.message for u in unknown_tags(conn, parse(query))]
    finally:
        conn.close()


def search(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return run_tagd("--config", str(cfg), "search", *args)


def test_not_and_and_are_operators() -> None:
    assert parse("1girl AND NOT hat") == And((Tag("1girl", None, 0), Not(Tag("hat", None, 14), 10)))
    node = parse("1girl NOT (hat | smile)")
    assert isinstance(node, And) and isinstance(node.terms[1], Not)
    assert node.terms[1].term == Or((Tag("hat", None, 11), Tag("smile", None, 17)))
    assert parse('"NOT" 1girl') == And((Tag("not", None, 0), Tag("1girl", None, 6)))


def test_unknown_terms_with_suggestions(index) -> None:
    db, _ = index
    assert messages(db, "1grl") == ["no tag '1grl' in the index; did you mean '1girl'?"]
    assert messages(db, "charcter:hatsune_miku") == [
        "no tag 'charcter:hatsune_miku' in the index; did you mean 'character:hatsune_miku'?"
    ]
    assert messages(db, "character:hatsune_mik") == [
        "no tag 'character:hatsune_mik' in the index; did you mean 'character:hatsune_miku'?"
    ]
    assert messages(db, "rating:sfw") == [
        "no rating 'sfw' in the index; ratings are general, sensitive, questionable, explicit"
    ]
    assert messages(db, "zzzqqq") == ["no tag 'zzzqqq' in the index"]
    assert messages(db, "hatz*") == ["no tag matches 'hatz*' in the index"]
    assert messages(db, "1girl hat* -smile re:zero smile:>0.5 character:*") == []
    assert messages(db, "1girl:>0.5 -smlie") == [
        "no tag 'smlie' in the index; did you mean 'smile'?"
    ]


def test_empty_index_says_scan_first(tmp_path: Path) -> None:
    connect(tmp_path / "e.db").close()
    assert messages(tmp_path / "e.db", "1girl") == [
        "the index has no tags yet: run `tagd scan` first"
    ]


@pytest.mark.slow
def test_search_names_unknown_tags_on_stderr(index) -> None:
    _, cfg = index
    r = search(cfg, "1grl")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "tagd: no tag '1grl' in the index; did you mean '1girl'?"
    r = search(cfg, "rating:sfw")
    assert r.returncode == 1
    assert "general, sensitive, questionable, explicit" in r.stderr
    r = search(cfg, "1girl AND NOT hat")
    assert r.returncode == search(cfg, "1girl -hat").returncode
    assert r.stdout == search(cfg, "1girl -hat").stdout and r.stderr == ""
    r = search(cfg, "1girl", "--explain")
    assert r.returncode == 0 and "UNKNOWN" not in r.stdout
    r = search(cfg, "1girl | 1grl", "--explain")
    assert r.returncode == 0
    line = next(x for x in r.stdout.splitlines() if "'1grl'" in x)
    assert "[UNKNOWN: no tag '1grl' in the index; did you mean '1girl'?]" in line


def test_one_error_names_an_unknown_model_with_a_guess(index: tuple[Path, Path]) -> None:
    """Every lookup of a model by name goes through require_model_id and its one error."""
    from tagd.index.inventory import UnknownModel, model_id, require_model_id

    conn = connect(index[0], readonly=True)
    try:
        assert require_model_id(conn, "wd") == model_id(conn, "wd") is not None
        with pytest.raises(UnknownModel) as err:
            require_model_id(conn, "wdx")
        assert (
            str(err.value)
            == "no model named 'wdx' in the index (known: dd, wd); did you mean 'wd'?"
        )
    finally:
        conn.close()
