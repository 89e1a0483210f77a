"""The built site, as a reader's browser sees it (headless Chromium driven by Playwright).

Runs against the folder in ``$EDGEFM_SITE`` (``make test`` points it at the smoke build), served
over HTTP on the loopback address. Skipped, with the reason, where no site was built or Chromium
is not installed; nothing is downloaded.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("EDGEFM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def toc_pages() -> list[str]:
    """Every page of ``_toc.yml`` as its HTML path relative to the site root."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f"{f}.html" for f in files]


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    folder = os.environ.get("EDGEFM_SITE")
    if not folder or not (Path(folder) / "index.html").is_file():
        pytest.skip("no built site: set EDGEFM_SITE to a built _build/html (make test does)")
    handler = functools.partial(QuietHandler, directory=folder)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest's output readable
        pass


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set EDGEFM_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    yield page
    page.close()


@functools.cache
def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.mark.parametrize("path", toc_pages())
def test_page_loads_with_title_images_and_links(site, page, path):
    response = page.goto(site + path, wait_until="load")
    assert response is not None and response.status == 200
    heading = page.locator("main h1").first.inner_text().strip("#¶ \n")
    assert heading and heading in page.title()

    images = page.eval_on_selector_all("main img", "els => els.map(e => [e.src, e.naturalWidth])")
    broken = [src for src, width in images if width == 0]
    assert not broken, f"{path}: images that did not render: {broken}"

    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    for href in {h for h in hrefs if h.startswith(site)}:
        target, fragment = urldefrag(href)
        status, html = fetch(target)
        assert status == 200, f"{path}: broken link {href} ({status})"
        if fragment and urlparse(target).path.endswith(".html"):
            assert f'id="{fragment}"' in html, f"{path}: link to missing anchor {href}"


def test_citations_resolve_to_bibliography_entries(site, page):
    page.goto(site + "book/problem.html")
    citations = page.eval_on_selector_all('main a[href*="bibliography.html#"]', "els => els.map(e => e.href)")
    assert len(citations) >= 5
    _, bibliography = fetch(site + "book/bibliography.html")
    for href in citations:
        assert f'id="{urldefrag(href)[1]}"' in bibliography


def test_search_finds_a_term(site, page):
    page.goto(site + "search.html?q=Fashion-MNIST")
    results = page.locator("#search-results li")
    results.first.wait_for(timeout=15_000)
    assert results.count() >= 1


def test_figures_are_numbered_and_screenshots_saved(site, page):
    out = Path(os.environ.get("EDGEFM_SCREENSHOTS", REPO / "_build" / "screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    page.goto(site + "book/data.html", wait_until="load")
    captions = page.locator("main figure figcaption").all_inner_texts()
    assert captions and all(c.strip().startswith("Fig.") for c in captions)
    page.screenshot(path=str(out / "data.png"), full_page=True)
    page.goto(site + "book/intro.html", wait_until="load")
    page.screenshot(path=str(out / "intro.png"), full_page=True)
    assert (out / "intro.png").stat().st_size > 10_000
