"""The web UI in a real browser (Playwright driving Debian's Chromium) against a live server
on a real index: autocomplete, grid, sidebar, image page and threshold slider, review, the
queue page, and a hostile tag name rendered as text.

TAGD_WEB_SCREENSHOTS=1 saves docs/web-grid.png and docs/web-image.png.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from conftest import run_tagd
from webindex import HOSTILE_NAME, HOSTILE_TAG, build

pytest.importorskip("starlette")
pytest.importorskip("playwright")

from tagd.config import load
from tagd.web.server import WebServer

pytestmark = pytest.mark.slow
CHROMIUM = os.environ.get("TAGD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _browser_or_skip() -> str:
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail(f"no Chromium at {CHROMIUM}: install the chromium package (see .ci/run)")
    pytest.skip(f"no Chromium at {CHROMIUM}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, probe_model: Path) -> Iterator[dict]:
    exe = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("webui")
    conf = build(root, probe_model, port=0)
    config = load(str(conf))
    server = WebServer(config, config.web)  # type: ignore[arg-type]
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                dialogs: list[str] = []
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.set_default_timeout(10_000)
                yield {
                    "url": server.url,
                    "page": page,
                    "root": root,
                    "conf": conf,
                    "config": config,
                    "dialogs": dialogs,
                }
            finally:
                browser.close()
    finally:
        server.stop()


def _shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    if os.environ.get("TAGD_WEB_SCREENSHOTS"):
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / name))


def test_autocomplete_then_grid_and_sidebar(live: dict) -> None:
    page = live["page"]
    page.goto(live["url"])
    assert page.locator("#grid a.cell").count() == 7  # every decodable image, newest first
    page.locator("#grid img").evaluate_all("imgs => Promise.all(imgs.map(i => i.decode()))")
    _shot(page, "web-grid.png")
    page.locator("#q").click()
    page.keyboard.type("re")
    item = page.locator("#ac li", has_text="red").first
    item.wait_for()
    assert page.locator("#ac li .n").first.inner_text().strip().isdigit()
    page.keyboard.press("Tab")
    assert page.locator("#q").input_value() == "red "
    page.keyboard.press("Enter")
    page.wait_for_url(lambda u: "q=red" in u)
    cells = page.locator("#grid a.cell")
    assert cells.count() >= 2
    # the count comes with the page when quick, else from /api/count right after
    page.wait_for_function("() => !document.querySelector('#count').dataset.pending")
    assert page.locator("#count").inner_text().strip() == str(cells.count())
    # sidebar: click adds a tag, shift-click adds it negated
    tags = page.locator("#sidebar a.tag").evaluate_all("as => as.map(a => a.dataset.tag)")
    assert "red" in tags and "rating:general" in tags
    other = next(t for t in tags if t != "red")
    here = page.url
    page.locator(f"#sidebar a.tag[data-tag='{other}']").click()
    page.wait_for_url(lambda u: u != here)
    assert parse_qs(urlparse(page.url).query)["q"][0] == f"red {other}"
    page.go_back()
    page.locator(f"#sidebar a.tag[data-tag='{other}']").click(modifiers=["Shift"])
    page.wait_for_url(lambda u: "-" in parse_qs(urlparse(u).query).get("q", [""])[0])
    assert parse_qs(urlparse(page.url).query)["q"][0] == f"red -{other}"


def test_image_page_threshold_slider_and_keyboard(live: dict) -> None:
    page = live["page"]
    page.goto(live["url"] + "?q=red")
    page.locator("#grid a.cell").first.click()
    page.wait_for_url(lambda u: "/image/" in u)
    model = page.locator("section.model[data-model=probe]")
    selected = model.locator("li.sel").count()
    total = model.locator("li[data-score]").count()
    assert 0 < selected < total
    model.locator("input.threshold").evaluate(
        "el => { el.value = '0.05'; el.dispatchEvent(new Event('input')); }"
    )
    assert model.locator("output").inner_text() == "0.05"
    assert model.locator("li.sel").count() > selected
    model.locator("input.threshold").evaluate(
        "el => { el.value = '1'; el.dispatchEvent(new Event('input')); }"
    )
    # only the top rating remains at threshold 1
    assert model.locator("li.sel").count() == 1
    assert model.locator("li.sel").get_attribute("data-ns") == "rating"
    first = page.url
    page.keyboard.press("ArrowRight")
    page.wait_for_url(lambda u: u != first and "i=1" in u)
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(lambda u: "i=0" in u)
    page.locator("#similar a").first.wait_for()
    assert page.locator("#dupes li", has_text="red").count() >= 1  # red2.png: a near duplicate
    page.locator("#full").evaluate("img => img.decode()")
    _shot(page, "web-image.png")


def _sha(live: dict, name: str) -> str:
    conn = sqlite3.connect(live["config"].database)
    try:
        return str(
            conn.execute(
                "SELECT f.sha256 FROM paths p JOIN files f ON f.id = p.file_id WHERE p.path = ?",
                (str(live["root"] / "g" / name),),
            ).fetchone()[0]
        )
    finally:
        conn.close()


def test_review_in_the_page_and_search_and_sidecar_follow(live: dict) -> None:
    page = live["page"]
    sha = _sha(live, "red2.png")
    page.goto(f"{live['url']}image/{sha}")
    effective = page.locator("#effective li[data-tag='general:red']")
    assert effective.count() == 1
    reject = page.locator("section.model button.rv[data-verdict='-1'][data-tag='general:red']")
    with page.expect_navigation():
        reject.click()
    assert page.locator("#effective li[data-tag='general:red']").count() == 0
    assert "general:red" in page.locator("#reviews").inner_text()
    page.goto(live["url"] + "?q=red")
    titles = page.locator("#grid a.cell").evaluate_all("as => as.map(a => a.title)")
    assert str(live["root"] / "g" / "red2.png") not in titles and titles
    r = run_tagd("--config", str(live["conf"]), "export", "sidecars", "--style", "hydrus")
    assert r.returncode == 0, r.stderr
    lines = (live["root"] / "g" / "red2.png.txt").read_text().splitlines()
    assert "red" not in lines
    assert "red" in (live["root"] / "g" / "red.png.txt").read_text().splitlines()


def test_hostile_tag_and_file_name_render_as_text(live: dict) -> None:
    page = live["page"]
    sha = _sha(live, HOSTILE_NAME)
    page.goto(f"{live['url']}image/{sha}")
    page.locator("#newtag").fill(HOSTILE_TAG)
    with page.expect_navigation():
        page.locator("#addtag button").click()
    human = page.locator("#effective li.human .name")
    assert HOSTILE_TAG in human.all_inner_texts()
    assert HOSTILE_NAME in page.locator("td.path").first.inner_text()
    page.goto(live["url"] + "?q=" + "path:*onerror*")
    assert page.locator("#grid a.cell").count() == 1
    assert live["dialogs"] == []  # nothing ran


def test_queue_page_pause_resume_retry(live: dict) -> None:
    page = live["page"]
    page.goto(live["url"] + "queue")
    assert "broken.png" in page.locator("#failed").inner_text()
    with page.expect_navigation():
        page.locator("button.qa[data-action=pause]").click()
    assert "paused" in page.locator("#daemon").inner_text()
    with page.expect_navigation():
        page.locator("button.qa[data-action=resume]").click()
    assert "paused" not in page.locator("#daemon").inner_text()
    with page.expect_navigation():
        page.locator("button.qa[data-action=retry]").click()
    assert "broken.png" not in page.locator("#failed").inner_text()


def test_random_grid_scrolls_through_every_file_once(live: dict, tmp_path: Path) -> None:
    """Endless scroll on sort=random fetches pages in one seeded order: 230 tiles, 230 files."""
    from conftest import write_config
    from indexdb import make_index

    g = tmp_path / "g"
    g.mkdir()
    files = {str(g / f"f{i:03}.png"): {"general": 0.9, "smile": 0.4 + i / 1000} for i in range(230)}
    make_index(tmp_path / "t.db", files).close()
    conf = write_config(
        tmp_path / "c.yaml",
        {"database": str(tmp_path / "t.db"), "watch": [str(g)], "web": {"port": 0}},
    )
    config = load(str(conf))
    server = WebServer(config, config.web)  # type: ignore[arg-type]
    server.start()
    try:
        page = live["page"]
        page.goto(server.url + "?sort=random")
        seed = parse_qs(urlparse(page.url).query)["seed"][0]  # kept in the URL for reloads
        cells = page.locator("#grid a.cell")
        shown = cells.count()
        assert shown == 100
        while page.locator("#more").count():
            page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            page.wait_for_function(
                "n => document.querySelectorAll('#grid a.cell').length > n"
                " || !document.querySelector('#more')",
                arg=shown,
            )
            shown = cells.count()
        titles = cells.evaluate_all("as => as.map(a => a.title)")
        assert len(titles) == len(set(titles)) == 230
        assert set(titles) == set(files)
        assert titles != sorted(titles)
        links = cells.evaluate_all("as => as.map(a => a.href)")
        assert all(f"seed={seed}" in link for link in links)
    finally:
        server.stop()
