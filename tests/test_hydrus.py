"""Hydrus sync against a local Client API server: requests, idempotency, human deletions."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import run_tagd, write_config
from hydrus_server import TAGD_KEY, HydrusServer, HydrusState
from indexdb import make_index, sha_of

from tagd.config import ConfigError, parse
from tagd.hydrus import sync as hydrus

KEY = "a" * 64
FILES = {
    "/g/a.png": {
        "general": 0.9,
        "long_hair": 0.8,
        "^_^": 0.7,
        "hatsune_miku": 0.95,
        "artist_x": 0.9,
        "smile": 0.2,
    },
    "/g/b.png": {"sensitive": 0.8, "general": 0.1, "smile": 0.6},
    "/g/c.png": {"general": 0.9, "solo": 0.9},
}


def _config(tmp_path: Path, url: str, **extra: object):
    (tmp_path / "key").write_text(KEY + "\n")
    return parse(
        {
            "database": str(tmp_path / "t.db"),
            "hydrus": {"enabled": True, "url": url, "access_key_file": "key", **extra},
        },
        base=tmp_path,
    )


def test_tag_text_follows_hydrus_conventions() -> None:
    ns = hydrus.DEFAULT_NAMESPACES
    assert hydrus.hydrus_tag("general", "long_hair", ns, "{tag}") == "long hair"
    assert hydrus.hydrus_tag("general", "^_^", ns, "{tag}") == "^_^"
    assert hydrus.hydrus_tag("character", "hatsune_miku", ns, "{tag}") == "character:hatsune miku"
    assert hydrus.hydrus_tag("artist", "Artist_X", ns, "{tag}") == "creator:artist x"
    assert hydrus.hydrus_tag("rating", "general", ns, "{tag}") == "rating:general"
    assert hydrus.hydrus_tag("general", ":d", ns, "{tag}") == "::d"
    assert hydrus.hydrus_tag("general", "smile", ns, "ai {tag}") == "ai smile"
    assert hydrus.hydrus_tag("meta", "highres", {"general": ""}, "{tag}") is None


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hydrus\.url"):
        parse({"hydrus": {"url": "localhost:45869"}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"hydrus\.tag_template"):
        parse({"hydrus": {"tag_template": "{score}"}}, base=tmp_path)
    with pytest.raises(ConfigError, match=r"hydrus\.sevice: unknown key; did you mean 'service'"):
        parse({"hydrus": {"sevice": "x"}}, base=tmp_path)
    assert parse({}, base=tmp_path).hydrus.enabled is False


def test_sync_pushes_once_and_respects_human_deletions(tmp_path: Path) -> None:
    conn = make_index(tmp_path / "t.db", FILES)
    state = HydrusState(access_key=KEY)
    a, b, c = (sha_of(p) for p in FILES)
    state.add_file(a)
    state.add_file(b)  # c is not in Hydrus
    state.tags(a, TAGD_KEY).add("long hair")  # already there
    state.human_delete(a, TAGD_KEY, "^_^")  # a human removed it before we ever pushed it
    with HydrusServer(state) as server:
        cfg = _config(tmp_path, server.url)
        report = hydrus.sync(conn, cfg)
        assert (report.considered, report.checked, report.unknown) == (3, 3, 1)
        assert state.tags(a, TAGD_KEY) == {
            "long hair",
            "rating:general",
            "character:hatsune miku",
            "creator:artist x",
        }
        assert state.tags(b, TAGD_KEY) == {"rating:sensitive", "smile"}
        assert c not in state.files
        assert report.kept_deleted == 1
        (meta,) = state.calls("/get_files/file_metadata")
        assert sorted(meta["query"]) == ["hashes", "include_services_object"]
        for call in state.calls("/add_tags/add_tags"):
            assert call["headers"][hydrus.KEY_HEADER.lower()] == KEY
            assert call["headers"]["content-type"] == "application/json"
            assert call["body"]["override_previously_deleted_mappings"] is False
            assert set(call["body"]) == {
                "hashes",
                "service_keys_to_actions_to_tags",
                "override_previously_deleted_mappings",
            }
        assert len(state.calls("/add_tags/add_tags")) == 2

        # unchanged index: nothing is asked for or sent again
        before = len(state.requests)
        again = hydrus.sync(conn, cfg)
        assert (again.checked, again.tags_added) == (0, 0)
        assert [r["path"] for r in state.requests[before:]] == ["/api_version", "/get_services"]

        # a human deletes a tag tagd pushed, then a retag changes the file: only the new tag goes
        state.tags(a, TAGD_KEY).discard("creator:artist x")  # removed without a deletion record
        conn.execute(
            "UPDATE scores SET selected = 1 WHERE tag_id = (SELECT id FROM tags WHERE name='smile')"
            " AND file_id = (SELECT id FROM files WHERE sha256 = ?)",
            (a,),
        )
        third = hydrus.sync(conn, cfg)
        assert (third.checked, third.tags_added) == (1, 1)
        assert "creator:artist x" not in state.tags(a, TAGD_KEY)
        assert "smile" in state.tags(a, TAGD_KEY)
        (last,) = state.calls("/add_tags/add_tags")[-1:]
        assert last["body"]["hashes"] == [a]
        assert last["body"]["service_keys_to_actions_to_tags"] == {TAGD_KEY: {"0": ["smile"]}}


def test_dry_run_sends_nothing_and_records_nothing(tmp_path: Path) -> None:
    conn = make_index(tmp_path / "t.db", FILES)
    state = HydrusState(access_key=KEY)
    state.add_file(sha_of("/g/b.png"))
    with HydrusServer(state) as server:
        report = hydrus.sync(conn, _config(tmp_path, server.url), dry_run=True)
    assert report.planned == {sha_of("/g/b.png"): ["rating:sensitive", "smile"]}
    assert state.calls("/add_tags/add_tags") == []
    assert conn.execute("SELECT count(*) FROM hydrus_pushed").fetchone()[0] == 0


@pytest.mark.parametrize(
    ("fail", "message"),
    [
        ({"/get_services": 403}, "refused the access key"),
        ({"/add_tags/add_tags": 500}, 'HTTP 500: {"error": "forced failure"}'),
    ],
)
def test_error_codes_become_one_line_errors(tmp_path: Path, fail: dict, message: str) -> None:
    conn = make_index(tmp_path / "t.db", FILES)
    state = HydrusState(access_key=KEY, fail=fail)
    state.add_file(sha_of("/g/b.png"))
    with HydrusServer(state) as server, pytest.raises(hydrus.HydrusError, match=message) as exc:
        hydrus.sync(conn, _config(tmp_path, server.url))
    assert KEY not in str(exc.value)
    # a failed push records nothing for its file, so the next sync tries again (files Hydrus
    # does not know are recorded as checked: that request succeeded)
    b_row = conn.execute(
        "SELECT count(*) FROM hydrus_pushed h JOIN files f ON f.id = h.file_id WHERE f.sha256 = ?",
        (sha_of("/g/b.png"),),
    ).fetchone()[0]
    assert b_row == 0
    assert conn.execute("SELECT count(*) FROM hydrus_pushed WHERE known = 1").fetchone()[0] == 0


def test_wrong_key_unknown_service_timeout_and_nobody_listening(tmp_path: Path) -> None:
    conn = make_index(tmp_path / "t.db", FILES)
    cases = [
        (HydrusState(access_key="b" * 64), {}, "HTTP 403"),
        (
            HydrusState(access_key=KEY),
            {"service": "ai"},
            "no local tag service named 'ai'.*my tags",
        ),
        (
            HydrusState(access_key=KEY, delay_s=1.0),
            {"timeout": 0.2},
            "did not answer /api_version within 0.2 s",
        ),
    ]
    for state, extra, message in cases:
        with HydrusServer(state) as server, pytest.raises(hydrus.HydrusError, match=message):
            hydrus.sync(conn, _config(tmp_path, server.url, **extra))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(hydrus.HydrusError, match="cannot reach Hydrus.*is the client running"):
        hydrus.sync(conn, _config(tmp_path, f"http://127.0.0.1:{port}"))


def test_cli_sync_dry_run_and_json(tmp_path: Path) -> None:
    make_index(tmp_path / "t.db", FILES).close()
    state = HydrusState(access_key=KEY)
    state.add_file(sha_of("/g/a.png"))
    with HydrusServer(state) as server:
        conf = write_config(
            tmp_path / "c.yaml",
            {
                "database": str(tmp_path / "t.db"),
                "hydrus": {"url": server.url, "access_key_env": "HK"},
            },
        )
        r = run_tagd("-c", str(conf), "hydrus", "sync", "--dry-run", env={"HK": KEY})
        assert r.returncode == 0, r.stderr
        assert "would add 5 tags to 1 files" in r.stderr
        assert "character:hatsune miku" in r.stdout
        assert state.calls("/add_tags/add_tags") == []
        r = run_tagd("-c", str(conf), "hydrus", "sync", "--json", env={"HK": KEY})
        assert r.returncode == 0, r.stderr
        assert '"tags_added": 5' in r.stdout
        missing = run_tagd("-c", str(conf), "hydrus", "sync", env={"HK": ""})
        assert missing.returncode == 3
        assert "no Hydrus access key" in missing.stderr and "Traceback" not in missing.stderr


def test_plan_file_rules() -> None:
    plan = hydrus.plan_file(
        desired=["a", "b", "c", "d", "e"],
        present={"a", "x", "y"},  # x, y: pushed earlier; y no longer desired
        deleted={"c", "d"},  # c: a human's deletion; d: tagd's own (retracted)
        pushed={"a", "b", "y"},  # b: pushed, then removed by a human without a record
        retracted={"d"},
        retract=True,
    )
    assert (plan.add, plan.readd, plan.remove) == (["e"], ["d"], ["y"])
    assert plan.pushed == {"a", "b", "d", "e"}
    assert plan.retracted == {"y"}
    assert plan.kept_deleted == 2  # b and c stay out
    keep = hydrus.plan_file(["a"], {"a", "y"}, set(), {"a", "y"}, set(), retract=False)
    assert (keep.add, keep.readd, keep.remove, keep.pushed) == ([], [], [], {"a", "y"})


def test_tags_no_longer_effective_are_removed_and_may_return(tmp_path: Path) -> None:
    conn = make_index(tmp_path / "t.db", FILES)
    state = HydrusState(access_key=KEY)
    a = sha_of("/g/a.png")
    state.add_file(a)

    def select(name: str, on: bool) -> None:
        conn.execute(
            "UPDATE scores SET selected = ? WHERE tag_id = (SELECT id FROM tags WHERE name = ?) "
            "AND file_id = (SELECT id FROM files WHERE sha256 = ?)",
            (int(on), name, a),
        )

    with HydrusServer(state) as server:
        cfg = _config(tmp_path, server.url)
        hydrus.sync(conn, cfg)
        assert {"long hair", "character:hatsune miku"} <= state.tags(a, TAGD_KEY)
        state.human_delete(a, TAGD_KEY, "creator:artist x")
        # Stricter thresholds: long_hair and the character stop being effective.
        select("long_hair", False)
        select("hatsune_miku", False)
        report = hydrus.sync(conn, cfg)
        assert report.tags_removed == 2 and "removed 2 no longer effective" in report.line()
        assert "long hair" not in state.tags(a, TAGD_KEY)
        assert {"long hair", "character:hatsune miku"} <= state.tags(a, TAGD_KEY, "2")
        (delete,) = [
            c for c in state.calls("/add_tags/add_tags")
            if "1" in c["body"]["service_keys_to_actions_to_tags"][TAGD_KEY]
        ]  # fmt: skip
        assert delete["body"]["service_keys_to_actions_to_tags"] == {
            TAGD_KEY: {"1": ["character:hatsune miku", "long hair"]}
        }
        # long_hair returns: tagd re-adds what it removed, never what a human removed.
        select("long_hair", True)
        report = hydrus.sync(conn, cfg)
        assert report.tags_added == 1 and report.tags_removed == 0
        assert "long hair" in state.tags(a, TAGD_KEY)
        assert "creator:artist x" not in state.tags(a, TAGD_KEY)
        last = state.calls("/add_tags/add_tags")[-1]["body"]
        assert last["override_previously_deleted_mappings"] is True
        assert last["service_keys_to_actions_to_tags"] == {TAGD_KEY: {"0": ["long hair"]}}
        # With retract off, nothing is ever removed.
        select("long_hair", False)
        before = len(state.calls("/add_tags/add_tags"))
        quiet = hydrus.sync(conn, _config(tmp_path, server.url, retract=False))
        assert quiet.tags_removed == 0 and len(state.calls("/add_tags/add_tags")) == before
        assert "long hair" in state.tags(a, TAGD_KEY)


def test_item16_sync_cut_short_between_groups_keeps_tagds_own_changes(tmp_path: Path) -> None:
    """Each request's outcome is recorded when Hydrus accepts it: a sync that fails after
    some groups went out must not later mistake tagd's own adds or deletions for a human's."""
    conn = make_index(tmp_path / "t.db", FILES)
    state = HydrusState(access_key=KEY)
    a, b = sha_of("/g/a.png"), sha_of("/g/b.png")
    state.add_file(a)
    state.add_file(b)
    add_tags = "/add_tags/add_tags"

    def select(sha: str, name: str, on: bool) -> None:
        conn.execute(
            "UPDATE scores SET selected = ? WHERE tag_id = (SELECT id FROM tags WHERE name = ?) "
            "AND file_id = (SELECT id FROM files WHERE sha256 = ?)",
            (int(on), name, sha),
        )

    def cut_after(groups: int) -> None:
        state.fail_after[add_tags] = len(state.calls(add_tags)) + groups

    with HydrusServer(state) as server:
        cfg = _config(tmp_path, server.url)
        cut_after(1)  # a's adds go out, b's fail
        with pytest.raises(hydrus.HydrusError, match="HTTP 500"):
            hydrus.sync(conn, cfg)
        assert "long hair" in state.tags(a, TAGD_KEY) and not state.tags(b, TAGD_KEY)
        state.fail_after.clear()
        report = hydrus.sync(conn, cfg)
        assert report.tags_added == 2 and state.tags(b, TAGD_KEY) == {"rating:sensitive", "smile"}

        # tagd added long hair (in the cut-short sync): when it stops being effective, tagd
        # takes it back, as its own; a human's tag would stay.
        select(a, "long_hair", False)
        select(b, "solo", True)  # b gets a new add group after a's remove group
        conn.execute(
            "INSERT INTO scores(file_id, model_id, tag_id, score, selected) SELECT f.id, "
            "s.model_id, t.id, 0.9, 1 FROM files f, tags t, (SELECT model_id FROM scores "
            "LIMIT 1) s WHERE f.sha256 = ? AND t.name = 'solo' AND NOT EXISTS (SELECT 1 FROM "
            "scores x WHERE x.file_id = f.id AND x.tag_id = t.id)",
            (b,),
        )
        cut_after(1)  # a's removal goes out, b's add fails
        with pytest.raises(hydrus.HydrusError, match="HTTP 500"):
            hydrus.sync(conn, cfg)
        assert "long hair" not in state.tags(a, TAGD_KEY)
        assert "long hair" in state.tags(a, TAGD_KEY, "2")
        state.fail_after.clear()
        report = hydrus.sync(conn, cfg)
        assert "solo" in state.tags(b, TAGD_KEY) and report.tags_removed == 0

        # The deletion was tagd's own: long hair comes back when it is effective again.
        select(a, "long_hair", True)
        report = hydrus.sync(conn, cfg)
        assert report.tags_added == 1 and "long hair" in state.tags(a, TAGD_KEY)
        assert report.kept_deleted == 0


def test_item16_sync_streams_in_bounded_batches(tmp_path: Path) -> None:
    """Many changed files: requests carry at most batch_size hashes each, and every file is
    recorded; a second sync sends nothing."""
    many = {f"/g/{i:03d}.png": {"general": 0.9, "solo": 0.9 if i % 2 else 0.1} for i in range(40)}
    conn = make_index(tmp_path / "t.db", many)
    state = HydrusState(access_key=KEY)
    for p in many:
        state.add_file(sha_of(p))
    with HydrusServer(state) as server:
        cfg = _config(tmp_path, server.url, batch_size=7)
        report = hydrus.sync(conn, cfg)
        assert report.checked == 40 and report.tags_added == 60
        metadata = state.calls("/get_files/file_metadata")
        assert len(metadata) == 6
        assert max(len(json.loads(c["query"]["hashes"])) for c in metadata) == 7
        assert conn.execute("SELECT count(*) FROM hydrus_pushed").fetchone()[0] == 40
        before = len(state.requests)
        again = hydrus.sync(conn, cfg)
        assert again.checked == 0 and len(state.requests) == before + 2


def test_item17_credentials_in_the_url_never_shown(tmp_path: Path, caplog) -> None:
    """`http://user:secret@host:port`: the credentials go to Hydrus (or a proxy in front of it)
    as Basic auth, and no error, CLI line or daemon warning shows them."""
    import logging

    from tagd.service.daemon import Daemon

    make_index(tmp_path / "t.db", FILES).close()
    state = HydrusState(access_key=KEY)
    state.add_file(sha_of("/g/a.png"))
    with HydrusServer(state) as server:
        url = server.url.replace("http://", "http://ann:s3cr%40t@")
        conf = write_config(
            tmp_path / "c.yaml",
            {"database": str(tmp_path / "t.db"), "hydrus": {"url": url, "access_key_env": "HK"}},
        )
        r = run_tagd("-c", str(conf), "hydrus", "sync", env={"HK": KEY})
        assert r.returncode == 0, r.stderr
        assert state.requests[0]["headers"]["authorization"] == "Basic YW5uOnMzY3JAdA=="
        assert "s3cr" not in r.stderr + r.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = f"http://ann:s3cr%40t@127.0.0.1:{port}"
    conf = write_config(
        tmp_path / "c.yaml",
        {"database": str(tmp_path / "t.db"), "hydrus": {"url": closed, "access_key_env": "HK"}},
    )
    r = run_tagd("-c", str(conf), "hydrus", "sync", env={"HK": KEY})
    assert r.returncode == 3 and f"127.0.0.1:{port}" in r.stderr, r.stderr
    assert "s3cr" not in r.stderr and "ann:" not in r.stderr
    for bad in (closed, f"http://ann:s3cr%40t@127.0.0.1:{port}x"):
        with pytest.raises(hydrus.HydrusError) as exc:
            hydrus.sync(make_index(tmp_path / "u.db", FILES), _config(tmp_path, bad, timeout=1))
        assert "s3cr" not in str(exc.value) and "ann:" not in str(exc.value)

    daemon = Daemon(_config(tmp_path, closed, interval=60), [])
    try:
        with caplog.at_level(logging.WARNING):
            daemon._hydrus_sync()
            daemon._hydrus_sync()
    finally:
        daemon.conn.close()
        daemon.health.close()
    warnings = [r.getMessage() for r in caplog.records if "hydrus sync failed" in r.getMessage()]
    assert len(warnings) == 2 and all("s3cr" not in w and "ann:" not in w for w in warnings)
    assert (
        hydrus.redact("see https://u:p@h:1/x and ftp://x@y")
        == "see https://***@h:1/x and ftp://***@y"
    )
