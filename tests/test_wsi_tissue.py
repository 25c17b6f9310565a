"""Tissue detection on the generated slides: exact regions, pen marks and specks excluded."""

from __future__ import annotations

import numpy as np
import pytest

from histotoken.data.wsi.reader import open_slide
from histotoken.data.wsi.tissue import detect_tissue, pen_mask, tissue_mask
from tests.slide_fixture import BLUE_PEN, GREEN_PEN, PINK, PURPLE, TISSUE_A, TISSUE_B, shared_slide_set


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


def _expected_mask(shape, scale):
    expected = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in (TISSUE_A, TISSUE_B):
        expected[y0 // scale: y1 // scale, x0 // scale: x1 // scale] = True
    return expected


def test_tissue_mask_equals_the_drawn_tissue_regions(slide_set):
    for key in ("tumour", "normal"):  # the tumour slide has purple tumour inside tissue A: still tissue
        with open_slide(slide_set[key]) as slide:
            tissue = detect_tissue(slide)
        assert tissue.level == 3 and tissue.scale == (8.0, 8.0)
        np.testing.assert_array_equal(tissue.mask, _expected_mask(tissue.mask.shape, 8))


def test_pen_colours_are_ink_and_stain_colours_are_not():
    colours = np.array([[BLUE_PEN, GREEN_PEN, (20, 20, 20), PINK, PURPLE, (255, 255, 255)]], dtype=np.uint8)
    np.testing.assert_array_equal(pen_mask(colours)[0], [True, True, True, False, False, False])


def test_pen_stroke_across_tissue_is_cut_out():
    image = np.full((100, 100, 3), 255, np.uint8)
    image[20:80, 20:80] = PINK
    image[48:52, :] = BLUE_PEN  # a stroke through the tissue
    mask, _ = tissue_mask(image, mpp=4.0)
    assert not mask[48:52].any()
    assert mask[30, 30] and mask[70, 70]
    assert not mask[:15].any()


def test_blank_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    image = (250 + rng.integers(-3, 4, size=(64, 64, 1))).repeat(3, axis=2).astype(np.uint8)
    mask, threshold = tissue_mask(image, mpp=8.0)
    assert not mask.any() and threshold >= 0.05


def test_tile_tissue_fractions_from_the_mask_are_exact(slide_set):
    with open_slide(slide_set["normal"]) as slide:
        tissue = detect_tissue(slide)
    xs = np.array([256, 1408, 1536, 192, 0])
    ys = np.array([256, 896, 896, 256, 1344])  # last one: on the blue pen stroke
    np.testing.assert_allclose(tissue.fractions(xs, ys, 128), [1.0, 0.5, 0.0, 0.5, 0.0])


def test_slide_without_a_coarse_level_is_shrunk_to_the_mask_resolution(slide_set, monkeypatch):
    from histotoken.data.wsi import tissue as tissue_module

    monkeypatch.setattr(tissue_module, "MAX_MASK_PIXELS", 10_000)  # level 3 (256 x 192) now counts as too big
    with open_slide(slide_set["normal"]) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.shape == (48, 64) and tissue.scale == (32.0, 32.0)  # 8 um: level 3 shrunk 4 times
    np.testing.assert_array_equal(tissue.mask, _expected_mask(tissue.mask.shape, 32))
