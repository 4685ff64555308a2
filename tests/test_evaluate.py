"""Evaluation metrics (pure) and `tagd eval` end to end, including the 1.0 control."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_tagd, write_config
from indexdb import make_index

from tagd.outputs.evaluate import PRF, Sample, evaluate, file_score, normalise, sweep


def test_file_score_is_tagger_showdowns() -> None:
    truth = {("general", "a"), ("general", "b"), ("general", "c"), ("general", "d")}
    assert file_score(truth, truth) == 1.0
    assert file_score({("general", "a"), ("general", "x")}, truth) == 0.0
    assert file_score({("general", "a"), ("general", "b")}, truth) == 0.5
    assert file_score(set(), set()) is None


def test_per_category_metrics_and_threshold_sweep() -> None:
    g = "general"
    samples = [
        Sample(
            {(g, "a"): 0.9, (g, "b"): 0.6, (g, "c"): 0.3},
            {(g, "a"), (g, "b")},
            {(g, "a"), (g, "c")},
        ),
        Sample({(g, "a"): 0.8, (g, "b"): 0.2}, {(g, "a")}, {(g, "a"), ("character", "k")}),
    ]
    r = evaluate("m", samples)
    gen = r.categories[g].at_thresholds
    assert (gen.tp, gen.fp, gen.fn) == (2, 1, 1)
    assert gen.precision == pytest.approx(2 / 3) and gen.recall == pytest.approx(2 / 3)
    assert r.categories["character"].at_thresholds == PRF(0, 0, 1)
    # general pairs: .9 T, .8 T, .6 F, .3 T, .2 F with 3 positives: best F1 at 0.3 (3 TP, 1 FP)
    assert r.categories[g].sweep.best_f1_threshold == 0.3
    assert r.categories[g].sweep.best_f1 == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert r.over_predicted == [("general:b", 1)]
    assert dict(r.under_predicted) == {"general:c": 1, "character:k": 1}
    s = sweep([(0.9, True), (0.5, False), (0.4, True)], positives=2)
    assert s.equal_pr_threshold == 0.5 and s.equal_pr == PRF(1, 1, 1)


def test_normalise_reads_hydrus_and_kohya_text() -> None:
    known = {"hatsune_miku": "character", "long_hair": "general", "general": "rating"}
    assert normalise("character:hatsune miku", known) == ("character", "hatsune_miku")
    assert normalise("hatsune miku", known) == ("character", "hatsune_miku")
    assert normalise("Long Hair", known) == ("general", "long_hair")
    assert normalise("creator:artist x", known) == ("artist", "artist_x")
    assert normalise("rating:general", known) == ("rating", "general")
    assert normalise("re:zero", known) == ("general", "re:zero")
    assert normalise("^_^", known) == ("general", "^_^")


FILES = {
    "a.png": {"general": 0.9, "long_hair": 0.8, "hatsune_miku": 0.95, "smile": 0.3},
    "b.png": {"sensitive": 0.8, "smile": 0.6, "solo": 0.2},
}


def _index(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    g = tmp_path / "g"
    g.mkdir()
    files = {str(g / k): v for k, v in FILES.items()}
    make_index(tmp_path / "t.db", files, model="m1").close()
    make_index(tmp_path / "t.db", {p: {"general": 0.9} for p in files}, model="m2").close()
    return write_config(tmp_path / "c.yaml", {"database": str(tmp_path / "t.db")}), {
        Path(p).name: p for p in files
    }


def test_control_scores_one_and_side_by_side(tmp_path: Path) -> None:
    conf, _ = _index(tmp_path)
    exported = run_tagd("-c", str(conf), "export", "--format", "jsonl", "--model", "m1")
    truth = tmp_path / "truth.jsonl"
    truth.write_text(exported.stdout)
    r = run_tagd("-c", str(conf), "eval", "-m", "m1", "-m", "m2", "--truth", str(truth), "--json")
    assert r.returncode == 0, r.stderr
    m1, m2 = json.loads(r.stdout)
    assert m1["files"] == 2 and m1["mean_file_score"] == 1.0
    for cat in m1["categories"].values():
        assert cat["at_thresholds"]["f1"] == 1.0
    assert m1["over_predicted"] == [] and m1["under_predicted"] == []
    assert m2["mean_file_score"] < 1.0
    text = run_tagd("-c", str(conf), "eval", "-m", "m1", "-m", "m2", "--truth", str(truth))
    assert text.returncode == 0, text.stderr
    header = text.stdout.splitlines()[0]
    assert "m1" in header and "m2" in header
    assert "[m2] under-predicted:" in text.stdout


def test_eval_against_sidecars_and_csv(tmp_path: Path) -> None:
    conf, paths = _index(tmp_path)
    Path(paths["a.png"] + ".txt").write_text("character:hatsune miku\nlong hair\nrating:general\n")
    Path(paths["b.png"]).with_suffix(".txt").write_text("smile, solo\n")
    r = run_tagd("-c", str(conf), "eval", "-m", "m1", "--truth", "sidecars", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)
    assert rep["files"] == 2
    # a: 3/3 right; b: smile right, solo missed, rating:sensitive not in the kohya truth
    assert rep["mean_file_score"] == pytest.approx((1.0 + (1 - 1) / 2) / 2)
    assert ["general:solo", 1] in rep["under_predicted"]
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text(f'path,tags\n{paths["a.png"]},"long_hair,smile"\n')
    r = run_tagd("-c", str(conf), "eval", "-m", "m1", "--truth", str(truth_csv), "--json")
    (rep,) = json.loads(r.stdout)
    assert rep["files"] == 1
    bad = run_tagd("-c", str(conf), "eval", "-m", "m1", "--truth", str(tmp_path / "x.csv"))
    assert bad.returncode == 2 and "x.csv" in bad.stderr and "Traceback" not in bad.stderr


def test_eval_against_hydrus_tags(tmp_path: Path) -> None:
    from hydrus_server import LOCAL_TAGS_KEY, HydrusServer, HydrusState
    from indexdb import sha_of

    _, paths = _index(tmp_path)
    state = HydrusState(access_key="b" * 64)
    a, b = sha_of(paths["a.png"]), sha_of(paths["b.png"])
    state.add_file(a)
    state.add_file(b)
    state.tags(a, LOCAL_TAGS_KEY).update({"character:hatsune miku", "long hair", "rating:general"})
    state.tags(b, LOCAL_TAGS_KEY).update({"smile", "solo", "rating:sensitive"})
    (tmp_path / "key").write_text("b" * 64)
    with HydrusServer(state) as server:
        conf = write_config(
            tmp_path / "h.yaml",
            {
                "database": str(tmp_path / "t.db"),
                "hydrus": {"url": server.url, "access_key_file": str(tmp_path / "key")},
            },
        )
        r = run_tagd("-c", str(conf), "eval", "-m", "m1", "--truth", "hydrus", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)
    assert rep["files"] == 2
    # a: all 3 truth tags predicted; b: smile and rating right, solo missed
    assert rep["mean_file_score"] == pytest.approx((1.0 + (2 - 0) / 3) / 2)
    assert ["general:solo", 1] in rep["under_predicted"]
    assert len(state.calls("/get_files/file_metadata")) == 2
