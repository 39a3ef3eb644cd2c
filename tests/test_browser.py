"""Open every page of the built book in headless Chromium and check what a reader sees.

Needs ``_build/html`` from ``make book`` and the Debian packages ``chromium`` and
``chromium-driver``. ``make test`` deselects this module (marker ``browser``); CI runs it
after ``make book`` with ``IMBA_REQUIRE_SITE=1``, which turns a missing site or browser into
a failure instead of a skip.

The site is served by ``http.server`` on 127.0.0.1 at a free port for the duration of the
module. Chromium resolves every other host name to nothing, so pages that reference a CDN
(MathJax) load without network access, and those requests are left out of the checks.
One full-page screenshot per chapter goes to ``_build/screenshots/``.
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import re
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urlsplit

import pytest

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parent.parent
# IMBA_SITE points the check at another build; screenshots go beside the site's folder.
SITE = Path(os.environ.get("IMBA_SITE") or REPO_ROOT / "_build" / "html").resolve()
SCREENSHOTS = SITE.parent / "screenshots"
REQUIRED = os.environ.get("IMBA_REQUIRE_SITE") == "1"
MAX_SCREENSHOT_HEIGHT = 12000  # px; longer pages are cut there

# Pages a reader reaches from the navigation; _static and _sources hold assets and sources.
PAGES = sorted(
    str(p.relative_to(SITE)) for p in SITE.rglob("*.html")
    if p.relative_to(SITE).parts[0] not in {"_static", "_sources"}
) if SITE.is_dir() else []
# Chapters: the notebooks and the hand-written pages, not the generated API pages, indexes
# or code listings.
CHAPTERS = {
    p for p in PAGES
    if p.startswith(("executed/", "book/")) and not p.startswith("book/api/")
} | {"book/api/index.html"}
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|\b\w*(Error|Exception)\b:")

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,900",
    # Keep every request on this machine: other host names do not resolve.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(reason + " (IMBA_REQUIRE_SITE=1)")
    pytest.skip(reason)


def test_site_built():
    if not (SITE / "index.html").is_file():
        _missing(f"{SITE}/index.html not found; run `make book` first")
    assert any(p.startswith("executed/") for p in PAGES), "the site has no notebook chapter"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@pytest.fixture(scope="module")
def base_url():
    if not (SITE / "index.html").is_file():
        _missing(f"{SITE}/index.html not found; run `make book` first")
    handler = functools.partial(_QuietHandler, directory=str(SITE))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    chromedriver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not chromedriver:
        _missing("chromium or chromedriver not found; apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


@functools.cache
def _fetch(url: str) -> tuple[int, str]:
    """HTTP status and body (HTML pages only) of a URL on the local server."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            kind = response.headers.get("Content-Type", "")
            body = response.read().decode("utf-8", "replace") if "html" in kind else ""
            return response.status, body
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _open(driver, url: str) -> None:
    driver.get(url)
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "if (document.readyState === 'complete') { done(); }"
        "else { window.addEventListener('load', () => done()); }"
    )


def _save_screenshot(driver, page: str) -> Path:
    """Full-page PNG of the current page, cut at MAX_SCREENSHOT_HEIGHT.

    The viewport is resized to the page height for the capture, so the sidebars keep the
    layout a 1280 px wide window shows.
    """
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    height = min(int(size["height"]), MAX_SCREENSHOT_HEIGHT)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False,
    })
    try:
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / (page.removesuffix(".html").replace("/", "__") + ".png")
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def _expected_figures(page: str) -> int:
    """Number of image outputs in the executed notebook that a chapter page renders."""
    notebook = REPO_ROOT / (page.removesuffix(".html") + ".ipynb")  # executed/<name>.ipynb
    if not page.startswith("executed/") or not notebook.is_file():
        return 0
    cells = json.loads(notebook.read_text())["cells"]
    return sum(
        1 for cell in cells for output in cell.get("outputs", [])
        if any(k.startswith("image/") for k in output.get("data", {}))
    )


@pytest.mark.parametrize("page", PAGES)
def test_page(page, base_url, driver):
    url = base_url + page
    status, _ = _fetch(url)
    assert status == 200, f"{page}: HTTP {status}"
    driver.get_log("browser")  # drop messages from the previous page
    _open(driver, url)

    assert driver.title.strip(), f"{page}: empty <title>"
    assert driver.find_elements("css selector", "main, article"), f"{page}: no main content"

    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete,"
        " i.naturalWidth, !!i.closest('.cell_output')]);"
    )
    local = [img for img in images if img[0].startswith(base_url)]
    broken = [src for src, complete, width, _ in local if not complete or width == 0]
    assert not broken, f"{page}: images that did not load or are empty: {broken}"
    figures = sum(1 for *_, in_output in local if in_output)
    expected = _expected_figures(page)
    assert figures >= expected, f"{page}: {figures} figures shown, notebook has {expected}"

    for selector in (".output.traceback", ".output.error", ".system-message"):
        blocks = driver.find_elements("css selector", selector)
        assert not blocks, f"{page}: {len(blocks)} '{selector}' block(s): {blocks[0].text[:300]}"
    for block in driver.find_elements("css selector", ".output.stderr, .cell_output .stderr"):
        text = block.text
        assert not ERROR_TEXT.search(text), f"{page}: stderr shows an error: {text[:300]}"

    # Chromium requests /favicon.ico from every site on its own; the book has none.
    severe = [
        entry["message"] for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and base_url in entry["message"]
        and "/favicon.ico" not in entry["message"]
    ]
    assert not severe, f"{page}: browser errors for local resources: {severe}"

    hrefs = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href);"
    )
    for href in sorted(set(hrefs)):
        if not href.startswith(base_url):
            continue
        target, fragment = urldefrag(href)
        status, body = _fetch(target)
        assert status == 200, f"{page}: link {href} returns HTTP {status}"
        if fragment and urlsplit(target).path.endswith(".html"):
            anchor = f'id="{fragment}"'
            assert anchor in body, f"{page}: link {href} points at a missing anchor"

    if page in CHAPTERS:
        shot = _save_screenshot(driver, page)
        assert shot.stat().st_size > 10_000, f"{page}: screenshot {shot} looks blank"
