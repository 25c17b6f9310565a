"""Tissue detection on the generated slides: exact regions at 8 um per pixel, pen marks and specks excluded."""

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
        # 8 um per pixel: level 3 (2 um) shrunk 4 times; every drawn edge falls on a mask pixel boundary.
        assert tissue.level == 3 and tissue.scale == (32.0, 32.0) and tissue.mask.shape == (48, 64)
        np.testing.assert_array_equal(tissue.mask, _expected_mask(tissue.mask.shape, 32))


def test_pen_colours_are_ink_and_stain_colours_are_not():
    colours = np.array([[BLUE_PEN, GREEN_PEN, (20, 20, 20), PINK, PURPLE, (255, 255, 255)]], dtype=np.uint8)
    np.testing.assert_array_equal(pen_mask(colours)[0], [True, True, True, False, False, False])


def test_ink_needs_a_large_connected_region():
    image = np.full((100, 100, 3), 240, np.uint8)
    image[10:14, 10:14] = (20, 20, 20)  # a dark speck: 16 px of 64 um2 = 0.001 mm2
    image[50:70, 10:90] = BLUE_PEN  # 1600 px = 0.1 mm2 at 8 um per pixel
    ink = pen_mask(image, mpp=8.0)
    assert not ink[10:14, 10:14].any() and ink[50:70, 10:90].all() and ink.sum() == 1600


def test_pen_stroke_across_tissue_is_cut_out():
    image = np.full((100, 100, 3), 245, np.uint8)
    image[20:80, 20:80] = PINK
    image[46:54, :] = BLUE_PEN  # a 64 um wide stroke through the tissue
    mask, _ = tissue_mask(image, mpp=8.0)
    assert not mask[46:54].any()
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


def test_blocks_read_from_a_fine_level_give_the_same_mask(slide_set, monkeypatch):
    from histotoken.data.wsi import tissue as tissue_module

    with open_slide(slide_set["normal"]) as slide:
        whole = detect_tissue(slide)
        monkeypatch.setattr(tissue_module, "READ_BLOCK", 40)  # 40 // 4 * 4 = 40-pixel blocks of level 3
        blocks = detect_tissue(slide)
    np.testing.assert_array_equal(blocks.image, whole.image)
    np.testing.assert_array_equal(blocks.mask, whole.mask)


def test_huge_declared_slides_get_a_coarser_mask(slide_set, monkeypatch):
    from histotoken.data.wsi import tissue as tissue_module

    monkeypatch.setattr(tissue_module, "MAX_MASK_PIXELS", 768)  # 64 x 48 at 8 um is over this: 16 um instead
    with open_slide(slide_set["normal"]) as slide:
        tissue = detect_tissue(slide)
    assert tissue.mask.shape == (24, 32) and tissue.scale == (64.0, 64.0)
    expected = _expected_mask(tissue.mask.shape, 64)
    assert tissue.mask[expected].all()
    assert (tissue.mask & ~expected).mean() < 0.05  # the 6 um pen lines are now faint colour in one pixel row
