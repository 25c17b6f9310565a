"""The study report opened in a real browser: headless Chromium (Debian's package) driven by Playwright.

Playwright's Python API drives the system browser (``executable_path``); nothing is downloaded at run
time. `.ci/browser.sh` installs chromium on CI. Without chromium (or without the playwright package)
these tests are skipped with a message that says which is missing.

Two pages are opened at 1280 x 800: the demo-sized study report of tests/study_fixture.py (or the report
that ``HISTOTOKEN_BROWSER_REPORT`` names, e.g. a `histotoken demo` output) and a slide report (two slides,
with thumbnails and heatmaps drawn by histotoken.data.wsi.thumbnails and slide-level metrics).

Text inside a figure cannot be measured in a browser (it is pixels); each figure image states the size of
its smallest text in its own pixels (``plots.SMALLEST_TEXT_KEY``, written as matplotlib draws it), and the
test multiplies that by the width the browser shows the image at over its natural width.

Screenshots of the first screen, the summary, one table and the slide report go to the test's tmp folder
and, when the environment variable ``HISTOTOKEN_SCREENSHOTS`` names a folder, there too.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from histotoken import formats
from histotoken.reporting import build_report
from histotoken.reporting.plots import smallest_text_px
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


MIN_TEXT_PX = 10.0
SLIDES = ("patient_001_node_0", "patient_002_node_1")


@pytest.fixture(scope="module")
def study_report(tmp_path_factory) -> Path:
    """The demo-sized study of tests/study_fixture.py (3 models x 3 domains), reported with figures inline;
    or the report that HISTOTOKEN_BROWSER_REPORT names (read only)."""
    given = os.environ.get("HISTOTOKEN_BROWSER_REPORT")
    if given:
        return Path(given).resolve()
    return build_report(write_study(tmp_path_factory.mktemp("browser")))


def write_slide_folder(out: Path) -> Path:
    """A `histotoken predict` output folder for two 96 x 64 px slide thumbnails: scores, the run record,
    slide-level metrics with intervals, tile thumbnails and heatmaps (drawn by histotoken's own functions)."""
    from histotoken.data.wsi.thumbnails import heatmap, png_bytes, tiling_thumbnail

    rng = np.random.default_rng(0)
    tiling = formats.TilePaths(out / "tiling")
    for index, slide in enumerate(SLIDES):
        image = np.full((64, 96, 3), 240, dtype=np.uint8)
        image[8:56, 10:86] = (230, 150, 200)
        mask = np.zeros((64, 96), dtype=bool)
        mask[8:56, 10:86] = True
        xs, ys = [x for x in range(16, 80, 16) for _ in range(16, 48, 16)], [y for _ in range(16, 80, 16)
                                                                              for y in range(16, 48, 16)]
        probabilities = rng.random(len(xs)) * (0.9 if index == 0 else 0.3)
        labels = ["tumor" if p > 0.5 else "normal" for p in probabilities]
        tiling.thumbnail(slide).parent.mkdir(parents=True, exist_ok=True)
        tiling.thumbnail(slide).write_bytes(png_bytes(tiling_thumbnail(image, mask, (1, 1), xs, ys, 16, labels)))
        heatmaps = out / formats.SLIDE_HEATMAPS_DIR
        heatmaps.mkdir(exist_ok=True)
        (heatmaps / f"{slide}.png").write_bytes(png_bytes(heatmap(image, (1, 1), xs, ys, 16, probabilities)))
    (out / formats.SLIDE_SCORES).write_text(
        "slide,n_tiles,score_max,score_topk_mean,prediction,slide_label,patient_id\n"
        f"{SLIDES[0]},12,0.87,0.71,tumor,tumor,patient_001\n{SLIDES[1]},12,0.29,0.22,normal,normal,patient_002\n")
    (out / formats.SLIDE_PREDICTION).write_text(json.dumps({
        "model_name": "mixer_tiny", "run_id": "run-7", "threshold": 0.5, "threshold_source": "default",
        "slide_score": "max"}))
    (out / formats.SLIDE_EVAL).write_text(json.dumps({
        "n_slides": 2, "n_bootstrap": 200, "auroc": 1.0, "accuracy": 1.0, "balanced_accuracy": 1.0,
        "macro_f1": 1.0, "ci95": {"auroc": [1.0, 1.0], "accuracy": [0.5, 1.0]}}))
    (out / "tiling" / formats.TILE_SUMMARY).write_text("slide,status,annotations\n" + "".join(
        f"{slide},done,\n" for slide in SLIDES))
    return out


@pytest.fixture(scope="module")
def slide_report(tmp_path_factory) -> Path:
    from histotoken.reporting.slides import build_slide_report

    return build_slide_report(write_slide_folder(tmp_path_factory.mktemp("slides") / "predictions"))


def open_page(browser, report: Path):
    """A report loaded at 1280 x 800, with every console error and request it caused."""
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(report.as_uri(), wait_until="load")
    return page, errors, requests


@pytest.fixture(scope="module")
def opened(browser, study_report):
    page, errors, requests = open_page(browser, study_report)
    yield page, errors, requests
    page.close()


@pytest.fixture(scope="module")
def opened_slides(browser, slide_report):
    page, errors, requests = open_page(browser, slide_report)
    yield page, errors, requests
    page.close()


REPORTS = {"study": ("opened", "study_report"), "slides": ("opened_slides", "slide_report")}


@pytest.fixture(params=list(REPORTS))
def any_report(request):
    """Each report in turn: (its kind, page, console errors, requests, the report's path)."""
    page_fixture, path_fixture = REPORTS[request.param]
    return (request.param, *request.getfixturevalue(page_fixture), request.getfixturevalue(path_fixture))


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


def test_the_report_loads_without_console_errors_or_network_requests(any_report):
    _, page, errors, requests, report = any_report
    assert errors == []
    assert [url for url in requests if not url.startswith("data:")] == [report.as_uri()]


def test_every_image_decodes(any_report):
    kind, page, _, _, _ = any_report
    images = page.evaluate(
        "Array.from(document.images).map(i => ({src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0}))"
    )
    assert len(images) >= (len(SLIDES) if kind == "slides" else 10)
    assert [image["src"] for image in images if not image["ok"]] == []


def test_nothing_is_wider_than_a_1280px_window(any_report):
    _, page, _, _, _ = any_report
    assert page.evaluate("document.documentElement.scrollWidth") <= VIEWPORT["width"]
    # a table scrolled inside its own box would not widen the page, but its right edge would pass the window
    too_wide = page.evaluate(
        """Array.from(document.querySelectorAll('body *'))
             .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
             .map(e => e.tagName + '.' + e.className + ' ' + (e.textContent || '').slice(0, 40))"""
    )
    assert too_wide == []


def test_intervals_stay_on_one_line_and_captions_are_at_least_10px(any_report):
    _, page, _, _, _ = any_report
    lines = page.evaluate("Array.from(document.querySelectorAll('td span.ci')).map(s => s.getClientRects().length)")
    assert lines and set(lines) == {1}
    sizes = page.evaluate(
        "Array.from(document.querySelectorAll('p, li, td, th, figcaption, figcaption .how, caption, td span.ci'))"
        ".map(e => parseFloat(getComputedStyle(e).fontSize))"
    )
    assert min(sizes) >= MIN_TEXT_PX


def test_text_inside_every_figure_is_at_least_10px_at_100_percent_zoom(any_report, browser):
    """Each image's smallest text (stated in the image, in its own pixels) times the scale the browser shows
    it at. Images folded away in a closed <details> are measured as they show when opened (on a page of
    their own, so that the shared page stays as it loads)."""
    report = any_report[-1]
    page = open_page(browser, report)[0]
    try:
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        shown = page.evaluate(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), alt: i.alt.slice(0, 60),"
            " scale: i.getBoundingClientRect().width / i.naturalWidth}))")
    finally:
        page.close()
    too_small = {}
    for image in shown:
        source = image["src"]
        data = (base64.b64decode(source.split(",", 1)[1]) if source.startswith("data:")
                else (report.parent / source).read_bytes())
        text_px = smallest_text_px(data)
        assert text_px is not None, f"{image['alt']}: the image does not state its smallest text size"
        if text_px * min(image["scale"], 1.0) < MIN_TEXT_PX:  # a shrunk image shrinks its text
            too_small[image["alt"]] = round(text_px * image["scale"], 1)
    assert shown and too_small == {}


def test_the_summary_is_on_the_first_screen(opened, tmp_path):
    page, _, _ = opened
    summary = page.locator("#summary")
    first_answer = page.locator("#summary li").first
    assert summary.bounding_box()["y"] < VIEWPORT["height"]
    assert first_answer.bounding_box()["y"] < VIEWPORT["height"]
    assert "Trained and tested on" in first_answer.inner_text()
    save_screenshot(page, "first_screen.png", tmp_path)
    save_screenshot(summary, "summary.png", tmp_path)


def test_table_of_contents_links_resolve(any_report):
    kind, page, _, _, _ = any_report
    targets = page.evaluate("Array.from(document.querySelectorAll('nav a')).map(a => a.getAttribute('href'))")
    assert len(targets) >= (3 if kind == "slides" else 8)
    assert all(target.startswith("#") for target in targets)
    missing = page.evaluate("ids => ids.filter(id => !document.getElementById(id))", [t[1:] for t in targets])
    assert missing == []


def test_every_table_fits_its_column(any_report, tmp_path):
    kind, page, _, _, _ = any_report
    overflowing = page.evaluate(
        """Array.from(document.querySelectorAll('section table'))
             .filter(t => t.getClientRects().length > 0)  // folded rows in a closed <details> are not shown
             .filter(t => t.getBoundingClientRect().right > t.closest('section').getBoundingClientRect().right + 0.5)
             .map(t => t.closest('section').id + ': ' + t.rows[0].textContent.slice(0, 60))"""
    )
    assert overflowing == []
    if kind == "slides":
        return  # the slide report's screenshots: test_the_slide_report_answers_on_its_first_screen
    table = page.locator("#in_domain table").first
    box = table.bounding_box()
    column = page.locator("#in_domain").bounding_box()
    assert box["x"] + box["width"] <= column["x"] + column["width"] + 0.5
    saved = save_screenshot(table, "in_domain_table.png", tmp_path)
    assert all(path.stat().st_size > 0 for path in saved)


def test_the_slide_report_answers_on_its_first_screen(opened_slides, tmp_path):
    """The title names the run and the slides; the scores, the threshold and the first slide's figure (with
    its colour bar) start on the first screen."""
    page, _, _ = opened_slides
    title = page.locator("h1").inner_text()
    assert title.startswith("Slide predictions of mixer_tiny (run run-7) on 2 slides")
    scores = page.locator("#slides table").first
    assert scores.bounding_box()["y"] < VIEWPORT["height"]
    assert "Decision threshold" in page.locator("#slides").inner_text()
    figure = page.locator("#heatmaps figure").first
    assert figure.bounding_box()["y"] < 2 * VIEWPORT["height"]
    save_screenshot(page, "slide_report_first_screen.png", tmp_path)
    saved = save_screenshot(figure, "slide_report_figure.png", tmp_path)
    assert all(path.stat().st_size > 0 for path in saved)
