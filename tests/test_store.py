"""What one stored result looks like in SQLite: rows, values, types, and replacement."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tagd.config import TagRules
from tagd.index import db, models, paths
from tagd.tagging import results
from tagd.tagging.labels import Labels
from tagd.tagging.thresholds import groups

LABELS = Labels(
    names=("general", "explicit", "smile", "long_hair", "solo", "miku"),
    namespaces=("rating", "rating", "general", "general", "general", "character"),
)
THRESHOLDS: dict[str, float | str] = {"general": 0.35, "character": 0.85, "rating": "top"}


def _rows(conn, file_id: int) -> list[tuple]:
    return conn.execute(
        """SELECT t.name, s.score, typeof(s.score), s.selected, typeof(s.selected)
           FROM scores s JOIN tags t ON t.id = s.tag_id WHERE s.file_id = ? ORDER BY t.name""",
        (file_id,),
    ).fetchall()


def test_save_stores_floor_and_selected_rows_and_replaces_them(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "t.db")
    rules = results.resolve_rules(
        LABELS.names, LABELS.namespaces, TagRules(aliases={"general:long_hair": "general:hair"})
    )
    with db.write(conn):
        model = models.register_model(
            conn, name="m", family="wd14", source="x", revision="r1", labels=LABELS, settings={}
        )
        file_id = paths.upsert_file(conn, "a" * 64, 10, 1, 1, "PNG")
        first = np.array([0.03, 0.01, 0.7, 0.6, 0.2, 0.04], dtype=np.float32)
        results.save(
            conn,
            file_id=file_id,
            model=model,
            scores=first,
            thresholds=THRESHOLDS,
            rules=rules,
            floor=0.05,
        )
    # Below the floor but selected (top rating) is kept; long_hair is moved to its alias.
    assert [tuple(r) for r in _rows(conn, file_id)] == [
        ("general", float(first[0]), "real", 1, "integer"),
        ("hair", float(first[3]), "real", 1, "integer"),
        ("long_hair", float(first[3]), "real", 0, "integer"),
        ("smile", float(first[2]), "real", 1, "integer"),
        ("solo", float(first[4]), "real", 0, "integer"),
    ]
    with db.write(conn):
        second = np.array([0.02, 0.9, 0.1, 0.01, 0.5, 0.9], dtype=np.float32)
        results.save(
            conn,
            file_id=file_id,
            model=model,
            scores=second,
            thresholds=THRESHOLDS,
            rules=rules,
            floor=0.05,
        )
    # A retry or re-tag replaces the result: nothing of the first one survives.
    assert [(r[0], r[1], r[3]) for r in _rows(conn, file_id)] == [
        ("explicit", float(second[1]), 1),
        ("miku", float(second[5]), 1),
        ("smile", float(second[2]), 0),
        ("solo", float(second[4]), 1),
    ]
    assert conn.execute("SELECT count(*) FROM taggings").fetchone()[0] == 1


def test_groups_are_each_namespaces_indices_in_sorted_order() -> None:
    by_ns = groups(LABELS.namespaces)
    assert list(by_ns) == ["character", "general", "rating"]
    assert {k: v.tolist() for k, v in by_ns.items()} == {
        "character": [5],
        "general": [2, 3, 4],
        "rating": [0, 1],
    }


def test_registering_a_model_creates_its_tags_once_and_keeps_their_ids(tmp_path: Path) -> None:
    """Tags a model brings are created in one batch; tags already known keep their ids and
    rows (a second start writes nothing); the mapping follows the label order, repeats too."""
    conn = db.connect(tmp_path / "t.db")
    with db.write(conn):
        known = models.tag_id(conn, "general", "smile")
    labels = Labels(
        names=("smile", "solo", "smile", "sm\u00efle", "solo"),
        namespaces=("general", "general", "general", "general", "character"),
    )
    with db.write(conn):
        first = models.register_model(
            conn, name="m", family="wd14", source="x", revision="r1", labels=labels, settings={}
        )
    ids = first.tag_ids.tolist()
    assert ids[0] == ids[2] == known and len(set(ids)) == 4
    names = dict(conn.execute("SELECT id, namespace || ':' || name FROM tags").fetchall())
    assert [names[i] for i in ids] == [
        "general:smile",
        "general:solo",
        "general:smile",
        "general:sm\u00efle",
        "character:solo",
    ]
    before = conn.total_changes
    with db.write(conn):
        again = models.register_model(
            conn, name="m", family="wd14", source="x", revision="r1", labels=labels, settings={}
        )
    assert again.tag_ids.tolist() == ids
    assert conn.total_changes - before == 1  # the model row's updated_at, no tag rewritten


def test_a_head_already_stored_is_not_written_again(tmp_path: Path) -> None:
    """Every start registers its models; a head (tens of MB) equal to the stored one is not
    rewritten, a changed one replaces it."""
    conn = db.connect(tmp_path / "t.db")
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6)).astype("<f4").tobytes()
    b = rng.standard_normal(6).astype("<f4").tobytes()
    with db.write(conn):
        model = models.register_model(
            conn, name="m", family="wd14", source="x", revision="r1", labels=LABELS, settings={}
        )
        models.save_head(conn, model.id, models.StoredHead("r1", 8, 6, w, b))
    before = conn.total_changes
    with db.write(conn):
        models.save_head(conn, model.id, models.StoredHead("r1", 8, 6, w, b))
    assert conn.total_changes == before
    w2 = bytes(4) + w[4:]
    with db.write(conn):
        models.save_head(conn, model.id, models.StoredHead("r1", 8, 6, w2, b))
    assert conn.total_changes == before + 1
    stored = models.load_head(conn, model.id)
    assert stored is not None and stored.weights == w2 and stored.bias == b


def test_a_database_in_a_folder_named_with_uri_characters_opens_read_only(tmp_path: Path) -> None:
    """Read-only connections go through an SQLite URI, where `#`, `?` and `%` mean something:
    a folder named with them must still open the right file."""
    folder = tmp_path / "my#gallery?v=1%20 (2)"
    folder.mkdir()
    db.connect(folder / "t.db").close()
    ro = db.connect(folder / "t.db", readonly=True)
    try:
        assert db.database_file(ro) == str(folder / "t.db")
    finally:
        ro.close()
    bare = db.connect_bare_readonly(folder / "t.db")
    try:
        assert bare.execute("SELECT count(*) FROM models").fetchone() == (0,)
    finally:
        bare.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # nothing beside it
