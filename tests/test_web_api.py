"""The web app through Starlette's test client on a real index: every endpoint, access
control, CSRF, traversal attempts, escaping, review semantics."""

from __future__ import annotations

import dataclasses
import io
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_tagd
from webindex import HOSTILE_NAME, HOSTILE_TAG, build, sha_of

pytest.importorskip("starlette")
from PIL import Image
from starlette.testclient import TestClient

from tagd.config import load
from tagd.web.app import create_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, probe_model: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("web")
    conf = build(root, probe_model)
    config = load(str(conf))
    app = create_app(config)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield {"root": root, "conf": conf, "config": config, "client": client, "app": app}


def _csrf(site: dict) -> dict[str, str]:
    return {"x-csrf-token": site["app"].state.tagd.csrf}


def test_search_json_mirrors_the_cli(site: dict) -> None:
    c = site["client"]
    r = c.get("/api/search", params={"q": "red", "limit": 10})
    assert r.status_code == 200
    body = r.json()
    cli = run_tagd("--config", str(site["conf"]), "search", "red").stdout.split()
    assert [h["path"] for h in body["hits"]] == cli
    assert len(cli) >= 2
    assert body["count"] in (len(cli), None)  # None: not counted within 10 ms (busy machine)
    hit = body["hits"][0]
    assert set(hit) == {"sha256", "path", "width", "height", "tags"}
    assert hit["width"] == 64 and "general:red" in hit["tags"]
    page2 = c.get("/api/search", params={"q": "red", "limit": 1, "offset": 1}).json()
    assert [h["path"] for h in page2["hits"]] == cli[1:2]
    newest = c.get("/api/search", params={"q": "", "sort": "newest", "limit": 100}).json()
    assert len(newest["hits"]) == 7  # every decodable image; the broken one failed
    assert c.get("/api/count", params={"q": "red"}).json() == {"count": len(cli)}


def test_random_pages_share_a_seed_and_tile_the_result(site: dict) -> None:
    c = site["client"]
    everything = c.get("/api/search", params={"sort": "random", "seed": 5}).json()
    assert everything["seed"] == 5
    order = [h["sha256"] for h in everything["hits"]]
    assert len(order) == len(set(order)) == 7
    pages = [
        c.get("/api/search", params={"sort": "random", "seed": 5, "limit": 3, "offset": o})
        for o in (0, 3, 6)
    ]
    assert [h["sha256"] for r in pages for h in r.json()["hits"]] == order
    first = c.get("/api/search", params={"sort": "random", "limit": 3}).json()
    rest = c.get("/api/search", params={"sort": "random", "seed": first["seed"]}).json()
    assert [h["sha256"] for h in rest["hits"]][:3] == [h["sha256"] for h in first["hits"]]
    assert "seed" not in c.get("/api/search", params={"q": "red"}).json()
    for bad in ("-1", "x", str(2**63)):
        r = c.get("/api/search", params={"sort": "random", "seed": bad})
        assert r.status_code == 400 and "seed" in r.json()["error"]
    # the grid draws a seed once and puts it on the grid and every image link
    html = c.get("/", params={"sort": "random"}).text
    seed = html.split('data-seed="', 1)[1].split('"', 1)[0]
    assert seed.isdigit() and html.count(f"seed={seed}&amp;i=") == 7
    kept = c.get("/", params={"sort": "random", "seed": seed}).text
    assert f'data-seed="{seed}"' in kept
    assert 'data-seed=""' in c.get("/", params={"q": "red"}).text


def test_bad_queries_and_limits_are_400_with_a_message(site: dict) -> None:
    c = site["client"]
    r = c.get("/api/search", params={"q": "(red"})
    assert r.status_code == 400 and "column" in r.json()["error"]
    assert c.get("/api/search", params={"q": "x" * 1001}).status_code == 400
    assert c.get("/api/search", params={"q": "red", "limit": 501}).status_code == 400
    assert c.get("/api/search", params={"q": "red", "limit": "abc"}).status_code == 400
    assert c.get("/api/search", params={"q": "red", "sort": "evil"}).status_code == 400
    assert c.get("/api/tags", params={"limit": 0}).status_code == 400
    page = c.get("/", params={"q": "(red"})
    assert page.status_code == 400 and "bad query" in page.text


def test_unknown_tag_gets_did_you_mean(site: dict) -> None:
    body = site["client"].get("/api/search", params={"q": "bluee"}).json()
    assert body["unknown"] == [{"tag": "bluee", "suggest": ["blue"]}]
    page = site["client"].get("/", params={"q": "bluee"}).text
    assert "did you mean" in page and 'data-to="blue"' in page


def test_autocomplete_prefix_wildcard_namespace_counts(site: dict) -> None:
    c = site["client"]
    rows = c.get("/api/tags", params={"prefix": "r"}).json()
    names = [r["tag"] for r in rows]
    assert "red" in names
    counts = [r["count"] for r in rows]
    assert counts == sorted(counts, reverse=True)
    red = next(r for r in rows if r["tag"] == "red")
    assert red["namespace"] == "general" and red["count"] >= 2
    assert [r["tag"] for r in c.get("/api/tags", params={"prefix": "*rimson*"}).json()] == [
        "crimson_knight"
    ]
    only = c.get("/api/tags", params={"prefix": "character:"}).json()
    assert {r["namespace"] for r in only} == {"character"}


def test_file_metadata_scores_and_similar(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "red.png")
    info = c.get(f"/api/files/{sha}").json()
    assert info["paths"] == [str(site["root"] / "g" / "red.png")]
    assert (info["width"], info["height"]) == (64, 48)
    scores = info["models"]["probe"]
    assert scores == sorted(scores, key=lambda s: -s["score"])
    assert any(s["tag"] == "red" and s["selected"] for s in scores)
    assert any(not s["selected"] for s in scores)  # below-threshold scores are there too
    sim = c.get(f"/api/similar/{sha}", params={"limit": 3}).json()
    assert sim["similar"] and sim["similar"][0]["sha256"] == sha_of(site, "red2.png")
    assert c.get(f"/api/files/{'0' * 64}").status_code == 404
    page = c.get(f"/image/{sha}")
    assert page.status_code == 200 and 'class="threshold"' in page.text
    assert 'id="similar"' in page.text  # the strip the page fills from /api/similar


def test_thumbnails_cached_oriented_and_placeholder(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "rotated.jpg")
    r = c.get(f"/thumbs/{sha}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
    assert "immutable" in r.headers["cache-control"]
    im = Image.open(io.BytesIO(r.content))
    assert im.size[1] > im.size[0]  # EXIF orientation applied: 80x40 shown as 40x80
    alpha = Image.open(io.BytesIO(c.get(f"/thumbs/{sha_of(site, 'sub/alpha.png')}").content))
    assert alpha.mode == "RGBA"
    thumbs = Path(f"{site['config'].database}.thumbs")
    assert (thumbs / sha[:2] / f"{sha}-128.webp").is_file()
    # an indexed file that no longer decodes: a placeholder, never a 500
    victim = site["root"] / "g" / "blue.png"
    vsha = sha_of(site, "blue.png")
    data = victim.read_bytes()
    victim.write_bytes(b"garbage")
    try:
        r = c.get(f"/thumbs/{vsha}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
    finally:
        victim.write_bytes(data)


def test_originals_by_hash_only_no_traversal_no_symlink_escape(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "green.png")
    r = c.get(f"/files/{sha}")
    assert r.status_code == 200 and r.content == (site["root"] / "g" / "green.png").read_bytes()
    for bad in ("../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2e%2e/c.yaml", sha[:10]):
        assert c.get(f"/files/{bad}").status_code == 404
        assert c.get(f"/thumbs/{bad}").status_code == 404
    # an indexed path swapped for a symlink out of the watch root is not served
    outside = site["root"] / "secret.png"
    outside.write_bytes(b"secret")
    red2 = site["root"] / "g" / "red2.png"
    keep = red2.read_bytes()
    red2.unlink()
    os.symlink(outside, red2)
    try:
        assert c.get(f"/files/{sha_of(site, 'red2.png')}").status_code == 404
    finally:
        red2.unlink()
        red2.write_bytes(keep)


def test_hostile_names_are_escaped(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, HOSTILE_NAME)
    r = c.post(f"/api/files/{sha}/review", json={"accept": [HOSTILE_TAG]}, headers=_csrf(site))
    assert r.status_code == 200, r.text
    page = c.get(f"/image/{sha}").text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    grid = c.get("/", params={"q": "path:*onerror*"}).text
    assert "<img src=x onerror" not in grid
    assert "script-src 'self'" in c.get("/").headers["content-security-policy"]


def test_review_through_the_api_changes_search(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "green.png")
    before = [h["sha256"] for h in c.get("/api/search", params={"q": "green"}).json()["hits"]]
    assert sha in before
    r = c.post(
        f"/api/files/{sha}/review",
        json={"reject": ["green"], "accept": ["grass"]},
        headers=_csrf(site),
    )
    assert r.status_code == 200, r.text
    after = [h["sha256"] for h in c.get("/api/search", params={"q": "green"}).json()["hits"]]
    assert sha not in after
    assert [h["sha256"] for h in c.get("/api/search", params={"q": "grass"}).json()["hits"]] == [
        sha
    ]
    # confidence filters and the hits' scores follow: the person's tag is 1.0, the rejected 0
    hits = c.get("/api/search", params={"q": "grass:>0.99"}).json()["hits"]
    assert [(h["sha256"], h["tags"]) for h in hits] == [(sha, {"general:grass": 1.0})]
    assert sha not in [
        h["sha256"] for h in c.get("/api/search", params={"q": "green:>0.01"}).json()["hits"]
    ]
    sidebar = (
        c.get("/", params={"q": "grass"}).text.split('id="sidebar"', 1)[1].split("</aside>")[0]
    )
    assert 'data-tag="grass"' in sidebar and 'data-tag="green"' not in sidebar
    info = c.get(f"/api/files/{sha}").json()
    assert {(v["tag"], v["verdict"]) for v in info["reviews"]} == {("green", -1), ("grass", 1)}
    assert any(s["tag"] == "green" and s["selected"] for s in info["models"]["probe"])
    r = c.post(f"/api/files/{sha}/review", json={"clear": ["green", "grass"]}, headers=_csrf(site))
    assert r.status_code == 200
    assert sha in [h["sha256"] for h in c.get("/api/search", params={"q": "green"}).json()["hits"]]
    bad = c.post(f"/api/files/{sha}/review", json={"accept": "green"}, headers=_csrf(site))
    assert bad.status_code == 400 and "list" in bad.json()["error"]


def test_writes_need_csrf_same_origin_and_allow_edits(site: dict) -> None:
    c = site["client"]
    sha = sha_of(site, "red.png")
    url = f"/api/files/{sha}/review"
    assert c.post(url, json={"accept": ["x"]}).status_code == 403
    assert c.post(url, json={"accept": ["x"]}, headers={"x-csrf-token": "nope"}).status_code == 403
    evil = {**_csrf(site), "origin": "http://evil.example"}
    assert c.post(url, json={"accept": ["x"]}, headers=evil).status_code == 403
    ro = create_app(site["config"], dataclasses.replace(site["config"].web, allow_edits=False))
    with TestClient(ro) as other:
        r = other.post(url, json={"accept": ["x"]}, headers={"x-csrf-token": "x"})
        assert r.status_code == 403 and "allow_edits" in r.json()["error"]
        assert other.post("/api/queue/pause").status_code == 403


def test_queue_page_and_actions(site: dict) -> None:
    c = site["client"]
    q = c.get("/api/queue").json()
    assert q["jobs"]["failed"] == 1 and q["failed"][0]["path"].endswith("broken.png")
    assert q["failed"][0]["error"]
    page = c.get("/queue").text
    assert "broken.png" in page and "retry failed" in page
    assert c.post("/api/queue/pause", headers=_csrf(site)).json() == {"paused": True}
    assert c.get("/api/queue").json()["paused"] is True
    assert c.post("/api/queue/resume", headers=_csrf(site)).json() == {"paused": False}
    assert c.post("/api/queue/retry", headers=_csrf(site)).json() == {"retried": 1}
    assert c.get("/api/queue").json()["jobs"]["failed"] == 0
    assert c.post("/api/queue/explode", headers=_csrf(site)).status_code == 404


def test_token_required_when_configured(site: dict) -> None:
    web = dataclasses.replace(site["config"].web, token="s3cret-token-123")
    app = create_app(site["config"], web)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert c.get("/api/search", params={"q": "red"}).status_code == 401
        assert c.get("/thumbs/" + "0" * 64, follow_redirects=False).status_code == 303
        assert c.get("/files/" + "0" * 64, follow_redirects=False).status_code == 303
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        bad = {"authorization": "Bearer wrong"}
        assert c.get("/api/search", params={"q": "red"}, headers=bad).status_code == 401
        good = {"authorization": "Bearer s3cret-token-123"}
        assert c.get("/api/search", params={"q": "red"}, headers=good).status_code == 200
        # a Bearer client needs no CSRF token for writes
        assert c.post("/api/queue/resume", headers=good).status_code == 200
        assert c.post("/login", data={"token": "wrong"}).status_code == 401
        r = c.post("/login", data={"token": "s3cret-token-123"}, follow_redirects=False)
        assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
        assert c.get("/api/search", params={"q": "red"}).status_code == 200  # cookie now


def test_refuses_other_addresses_without_a_token(site: dict) -> None:
    r = run_tagd("--config", str(site["conf"]), "serve", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2
    assert "without an access token" in r.stderr and r.stderr.count("\n") == 1


def test_base_path_behind_a_proxy(site: dict) -> None:
    web = dataclasses.replace(site["config"].web, base_path="/tagd")
    with TestClient(create_app(site["config"], web)) as c:
        page = c.get("/tagd/", params={"q": "red"})
        assert page.status_code == 200
        assert 'href="/tagd/static/app.css"' in page.text and "/tagd/thumbs/" in page.text
        assert c.get("/tagd/api/search", params={"q": "red"}).status_code == 200
        assert c.get("/tagd/static/app.js").status_code == 200
        assert c.get("/api/search", params={"q": "red"}).status_code == 404


def test_serve_without_the_extra_says_what_to_install(site: dict) -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['uvicorn'] = None; from tagd.cli import main; "
        f"sys.exit(main(['--config', {str(site['conf'])!r}, 'serve']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "pip install 'tagd[web]'" in r.stderr and r.stderr.count("\n") == 1


def test_image_page_says_a_file_is_in_hydrus_without_leaking_the_key(
    site: dict, tmp_path: Path
) -> None:
    sha = sha_of(site, "red.png")
    conn = sqlite3.connect(site["config"].database)
    try:
        file_id = conn.execute("SELECT id FROM files WHERE sha256 = ?", (sha,)).fetchone()[0]
        conn.execute(
            "INSERT INTO hydrus_pushed(file_id, service_key, known, desired_hash, pushed,"
            " checked_at) VALUES (?, 'svc', 1, '', '[]', 0)",
            (file_id,),
        )
        conn.commit()
    finally:
        conn.close()
    hydrus = dataclasses.replace(
        site["config"].hydrus, enabled=True, url="http://user:secret@127.0.0.1:45869"
    )
    config = dataclasses.replace(site["config"], hydrus=hydrus)
    with TestClient(create_app(config), base_url="http://127.0.0.1") as client:
        page = client.get(f"/image/{sha}").text
    assert f"system:hash = {sha}" in page and "in Hydrus" in page
    assert "secret" not in page and "get_files" not in page and "45869" not in page
