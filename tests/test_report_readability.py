"""Figures a reader can read (issue 18): no placeholder cells in the error grids, and no figure text under
10 px at 100% zoom.

A browser cannot measure text inside a raster image, so the size is computed from what drew it: every
figure image states the font size of its smallest drawn text in its own pixels (points x dpi / 72, noted
by the Agg renderer as it draws; ``plots.SMALLEST_TEXT_KEY`` in a PNG text chunk or a JPEG comment), and
the page shows an image at its natural width unless it is wider than the column (``PAGE_COLUMN_PX``), where
it is scaled down with its text. Text px on screen = smallest text px x shown width / natural width. The
browser test (tests/test_report_browser.py) does the same with the shown width the browser lays out.
"""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from histotoken.explain import figures
from histotoken.formats import EXPLAIN_DIR, EXPLAIN_SCORES, RunPaths
from histotoken.reporting import build_report, plots
from histotoken.reporting.render import PAGE_COLUMN_PX
from tests.study_fixture import write_study

MIN_TEXT_PX = 10.0
BREAKHIS_CLASSES = ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma", "ductal_carcinoma",
                    "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"]
OUTCOMES = ["TP", "FP", "FN"]


def _noise(rng, size: int = 48) -> np.ndarray:
    return rng.integers(0, 255, (size, size, 3), dtype=np.uint8)


def _panels(png: bytes, tile_px: int) -> list[np.ndarray]:
    """The image panels of a mosaic PNG: connected non-white regions at least half a tile in area
    (caption letters are far smaller), each as its RGB pixels."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    not_white = (rgb < 245).any(axis=-1)
    regions = [r for r in regionprops(label(not_white, connectivity=1)) if r.area >= 0.5 * tile_px ** 2]
    return [rgb[r.slice] for r in regions]


def test_the_error_grid_draws_only_the_cells_that_hold_an_image():
    """Two classes; "b" has one error (FN) and nothing else: 2 panels, not 2 x 3 cells with 4 placeholders."""
    rng = np.random.default_rng(0)
    cells = {(name, outcome): None for name in ("a", "b") for outcome in OUTCOMES}
    cells[("a", "TP")] = (_noise(rng), rng.random((48, 48)), "a 0.90")
    cells[("b", "FN")] = (_noise(rng), rng.random((48, 48)), "a 0.61")
    figure = figures.outcome_grid_figure(cells, ["a", "b"], OUTCOMES, "gradcam")
    png = plots.figure_to_png(figure)
    tile_px = round(figures.CELL_IN * plots.DPI)  # a panel's side in the PNG
    panels = _panels(png, tile_px)
    assert len(panels) == 2
    for panel in panels:  # a blank cell is one flat colour; a panel holds the (noisy) image
        assert panel.shape[0] >= 0.9 * tile_px and panel.shape[1] >= 0.9 * tile_px
        assert panel.reshape(-1, 3).std(axis=0).mean() > 20
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert texts == ["a: TP\na 0.90", "b: FN\na 0.61"]  # each panel names its class and outcome


def test_a_full_breakhis_error_grid_wraps_its_panels_three_to_a_row():
    rng = np.random.default_rng(1)
    present = [("adenosis", "FN"), ("fibroadenoma", "TP"), ("fibroadenoma", "FP"), ("ductal_carcinoma", "TP"),
               ("papillary_carcinoma", "FN")]
    cells = {key: (_noise(rng), rng.random((48, 48)), "papillary_carcinoma 0.73") for key in present}
    png = plots.figure_to_png(figures.outcome_grid_figure(cells, BREAKHIS_CLASSES, OUTCOMES, "rollout"))
    tile_px = round(figures.CELL_IN * plots.DPI)
    panels = _panels(png, tile_px)
    assert len(panels) == 5
    width, height = Image.open(io.BytesIO(png)).size
    assert width < 3.5 * tile_px * 1.1 and height < 2.5 * tile_px * 1.6  # 3 + 2 panels, no empty rows


def _text_boxes(figure):
    renderer = figure.canvas.get_renderer()
    figure.draw(renderer)
    return [(text.get_text(), text.get_window_extent(renderer)) for text in figure.findobj(
        lambda artist: hasattr(artist, "get_text") and hasattr(artist, "get_window_extent")
        and artist.get_visible() and str(artist.get_text()).strip() and artist.axes is not None
        and artist in artist.axes.texts)]


@pytest.mark.parametrize("name", ["outcomes", "per_image", "token_maps"])
def test_explanation_captions_stay_inside_the_figure_and_do_not_overlap(name):
    """The longest BreakHis class names, as the demo draws them: every caption is inside the figure and
    no two captions cover each other."""
    rng = np.random.default_rng(2)
    images = np.stack([_noise(rng) for _ in range(3)])
    if name == "outcomes":
        cells = {(c, o): (_noise(rng), rng.random((48, 48)), "papillary_carcinoma 0.73")
                 for c in BREAKHIS_CLASSES for o in OUTCOMES}
        figure = figures.outcome_grid_figure(cells, BREAKHIS_CLASSES, OUTCOMES, "gradcam")
    elif name == "per_image":
        figure = figures.per_image_figure(images, {"rollout": rng.random((3, 48, 48)),
                                                   "gradcam": rng.random((3, 48, 48))},
                                          ["true mucinous_carcinoma\npred papillary_carcinoma (0.73)"] * 3)
    else:
        figure = figures.token_maps_figure(images, rng.random((3, 8, 48, 48)), "tokens")
    assert figure.get_figwidth() * plots.DPI <= plots.MAX_FIGURE_PX + 0.5
    boxes = _text_boxes(figure)
    assert boxes
    page = figure.bbox
    for text, box in boxes:
        assert page.x0 - 0.5 <= box.x0 and box.x1 <= page.x1 + 0.5 and box.y1 <= page.y1 + 0.5, text
    for i, (first, a) in enumerate(boxes):
        for second, b in boxes[i + 1:]:
            assert not a.overlaps(b), (first, second)


def test_the_smallest_text_is_what_the_renderer_drew():
    """Hand-worked: 5 pt at 110 dpi is 7.64 px; tick labels of an axis switched off are not drawn, so they
    do not count; a figure without text states nothing."""
    figure = plots.new_figure(3, 2)
    ax = figure.subplots()
    ax.plot([0, 1])
    ax.set_title("title", fontsize=9)
    ax.text(0.5, 0.5, "small", fontsize=5)
    assert plots.render_png(figure)[1] == pytest.approx(5 * 110 / 72)
    hidden = plots.new_figure(3, 2)
    ax = hidden.subplots()
    ax.imshow(np.zeros((4, 4)))
    ax.tick_params(labelsize=3)
    ax.set_axis_off()
    assert plots.render_png(hidden)[1] is None
    ax.text(0, 0, "eight", fontsize=8)
    png = plots.figure_to_png(hidden)
    assert plots.smallest_text_px(png) == pytest.approx(8 * 110 / 72, abs=0.01)
    assert Image.open(io.BytesIO(png)).text[plots.SMALLEST_TEXT_KEY] == "12.22"  # read back by Pillow
    photo = plots.new_figure(3, 2)
    photo.subplots().imshow(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    photo.suptitle("a photograph", fontsize=8)
    jpeg = plots.figure_to_jpeg(photo)
    assert jpeg[:2] == b"\xff\xd8" and plots.smallest_text_px(jpeg) == pytest.approx(12.22)  # a JPEG comment


def _write_explanation(run_dir, rng) -> None:
    """What `histotoken explain` writes for a run: explain.json naming PNG figures drawn by explain.figures."""
    folder = RunPaths(run_dir).root / EXPLAIN_DIR / "100"
    folder.mkdir(parents=True)
    images = np.stack([_noise(rng, 32) for _ in range(3)])
    maps = rng.random((3, 32, 32))
    cells = {("adenosis", "FN"): (images[0], maps[0], "tubular_adenoma 0.40"),
             ("ductal_carcinoma", "TP"): (images[1], maps[1], "ductal_carcinoma 0.92")}
    drawn = {
        "per_image": figures.per_image_figure(images, {"gradcam": maps}, ["true adenosis\npred adenosis (0.8)"] * 3),
        "outcomes_gradcam": figures.outcome_grid_figure(cells, BREAKHIS_CLASSES, OUTCOMES, "gradcam"),
        "token_maps": figures.token_maps_figure(images, rng.random((3, 8, 32, 32)), "where each token pools from"),
        "tsne": figures.tsne_figure(rng.random((12, 2)), BREAKHIS_CLASSES[:4] * 3, ["100", "400"] * 6, "t-SNE"),
        "faithfulness": figures.faithfulness_figure(
            {"gradcam": {"deletion": np.linspace(1, 0, 5), "insertion": np.linspace(0, 1, 5)},
             "random": {"deletion": np.ones(5) / 2, "insertion": np.ones(5) / 2}}, "random"),
    }
    names = {}
    for key, figure in drawn.items():
        names[key] = f"{key}.png"
        (folder / names[key]).write_bytes(plots.figure_to_png(figure))
    (folder / EXPLAIN_SCORES).write_text(json.dumps({
        "model_name": "resnet18", "domain": "100", "n_images": 3, "n_test_images": 30, "figures": names,
        "faithfulness": {}}))


@pytest.fixture(scope="module")
def report_with_explanations(tmp_path_factory):
    study = write_study(tmp_path_factory.mktemp("readability"))
    from histotoken.reporting.study import load_study

    run_id, run_dir = load_study(study).run_folders()[0]
    _write_explanation(run_dir, np.random.default_rng(3))
    return build_report(study)


def test_no_figure_text_in_the_report_is_under_10px_at_100_percent_zoom(report_with_explanations):
    page = report_with_explanations.read_text()
    sources = re.findall(r'<img alt="([^"]*)" src="data:image/(?:png|jpeg);base64,([^"]+)"', page)
    assert len(sources) > 20 and any("most confident" in alt for alt, _ in sources)
    smallest = {}
    for alt, data in sources:
        image = base64.b64decode(data)
        text_px = plots.smallest_text_px(image)
        assert text_px is not None, f"{alt}: the image does not state its smallest text size"
        width = Image.open(io.BytesIO(image)).width
        shown = min(width, PAGE_COLUMN_PX - 2)  # max-width: 100% of the column, less the 1 px border
        smallest[alt] = text_px * shown / width
    assert min(smallest.values()) >= MIN_TEXT_PX, min(smallest.items(), key=lambda item: item[1])
