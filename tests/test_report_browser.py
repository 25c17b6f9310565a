"""The study report opened in a real browser: headless Chromium (Debian's package) driven by Playwright.

Playwright's Python API drives the system browser (``executable_path``); nothing is downloaded at run
time. `.ci/browser.sh` installs chromium on CI. Without chromium (or without the playwright package)
these tests are skipped with a message that says which is missing.

Screenshots of the first screen, the summary and one table go to the test's tmp folder and, when the
environment variable ``HISTOTOKEN_SCREENSHOTS`` names a folder, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from histotoken.reporting import build_report
from tests.study_fixture import write_study

pytestmark = pytest.mark.browser

VIEWPORT = {"width": 1280, "height": 800}
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium_path() -> str | None:
    """``HISTOTOKEN_CHROMIUM``, else chromium on the PATH (Debian's package installs /usr/bin/chromium)."""
    configured = os.environ.get("HISTOTOKEN_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    return next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (pip install -e '.[test]')"
    )
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium found (run .ci/browser.sh, or `apt-get install chromium`, "
                    "or set HISTOTOKEN_CHROMIUM to its path)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def study_report(tmp_path_factory) -> Path:
    """The demo-sized study of tests/study_fixture.py (3 models x 3 domains), reported with figures inline."""
    return build_report(write_study(tmp_path_factory.mktemp("browser")))


@pytest.fixture(scope="module")
def opened(browser, study_report):
    """The report loaded at 1280 x 800, with every console error and request it caused."""
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(study_report.as_uri(), wait_until="load")
    yield page, errors, requests
    page.close()


def save_screenshot(page_or_element, name: str, folder: Path) -> list[Path]:
    """Save a PNG screenshot to ``folder`` and, when HISTOTOKEN_SCREENSHOTS is set, there too."""
    folders = [folder] + ([Path(os.environ["HISTOTOKEN_SCREENSHOTS"])] if os.environ.get("HISTOTOKEN_SCREENSHOTS")
                          else [])
    saved = []
    for target in folders:
        target.mkdir(parents=True, exist_ok=True)
        page_or_element.screenshot(path=str(target / name))
        saved.append(target / name)
    return saved


def test_the_report_loads_without_console_errors_or_network_requests(opened, study_report):
    page, errors, requests = opened
    assert errors == []
    assert [url for url in requests if not url.startswith("data:")] == [study_report.as_uri()]


def test_every_image_decodes(opened):
    page, _, _ = opened
    images = page.evaluate(
        "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0}))"
    )
    assert len(images) > 10
    assert [image["src"] for image in images if not image["ok"]] == []


def test_nothing_is_wider_than_a_1280px_window(opened):
    page, _, _ = opened
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    # a table scrolled inside its own box would not widen the page, but its right edge would pass the window
    too_wide = page.evaluate(
        """Array.from(document.querySelectorAll('body *'))
             .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
             .map(e => e.tagName + '.' + e.className + ' ' + (e.textContent || '').slice(0, 40))"""
    )
    assert too_wide == []


def test_intervals_stay_on_one_line_and_captions_are_at_least_10px(opened):
    page, _, _ = opened
    lines = page.evaluate("Array.from(document.querySelectorAll('td span.ci')).map(s => s.getClientRects().length)")
    assert lines and set(lines) == {1}
    sizes = page.evaluate(
        "Array.from(document.querySelectorAll('figcaption, figcaption .how, caption, td span.ci'))"
        ".map(e => parseFloat(getComputedStyle(e).fontSize))"
    )
    assert min(sizes) >= 10
    # figures are drawn with text of at least 7 pt at 110 dpi (10.7 px): shown at >= 94% of their size,
    # their smallest text stays >= 10 px at 100% zoom
    scales = page.evaluate(
        "Array.from(document.images).filter(i => i.getClientRects().length > 0)"  # shown, not folded away
        ".map(i => i.getBoundingClientRect().width / i.naturalWidth)"
    )
    assert min(scales) >= 0.94


def test_the_summary_is_on_the_first_screen(opened, tmp_path):
    page, _, _ = opened
    summary = page.locator("#summary")
    first_answer = page.locator("#summary li").first
    assert summary.bounding_box()["y"] < VIEWPORT["height"]
    assert first_answer.bounding_box()["y"] < VIEWPORT["height"]
    assert "Trained and tested on" in first_answer.inner_text()
    save_screenshot(page, "first_screen.png", tmp_path)
    save_screenshot(summary, "summary.png", tmp_path)


def test_table_of_contents_links_resolve(opened):
    page, _, _ = opened
    targets = page.evaluate("Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href'))")
    assert len(targets) >= 8 and all(target.startswith("#") for target in targets)
    missing = page.evaluate("ids => ids.filter(id => !document.getElementById(id))", [t[1:] for t in targets])
    assert missing == []


def test_every_table_fits_its_column(opened, tmp_path):
    page, _, _ = opened
    overflowing = page.evaluate(
        """Array.from(document.querySelectorAll('section table'))
             .filter(t => t.getClientRects().length > 0)  // folded rows in a closed <details> are not shown
             .filter(t => t.getBoundingClientRect().right > t.closest('section').getBoundingClientRect().right + 0.5)
             .map(t => t.closest('section').id + ': ' + t.rows[0].textContent.slice(0, 60))"""
    )
    assert overflowing == []
    table = page.locator("#in_domain table").first
    box = table.bounding_box()
    column = page.locator("#in_domain").bounding_box()
    assert box["x"] + box["width"] <= column["x"] + column["width"] + 0.5
    saved = save_screenshot(table, "in_domain_table.png", tmp_path)
    assert all(path.stat().st_size > 0 for path in saved)
