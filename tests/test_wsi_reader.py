"""OpenSlide reader: generated pyramids open with their levels and mpp; errors name the file and the fix."""

from __future__ import annotations

import numpy as np
import pytest

from histotoken.data.wsi.reader import Resolution, open_slide
from histotoken.data.wsi.synthetic import Shape, write_slide
from tests.slide_fixture import MPP, PINK, SIZE, TISSUE_A, shared_slide_set


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


def test_generated_slide_opens_as_a_pyramid_with_its_mpp(slide_set):
    with open_slide(slide_set["tumour"]) as slide:
        assert slide.level_count == 4
        assert slide.dimensions == SIZE
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0, 8.0))
        assert slide.mpp == pytest.approx(MPP)
        assert slide.handle.properties["openslide.vendor"] == "generic-tiff"


def test_best_level_is_the_coarsest_not_coarser_than_the_target(slide_set):
    with open_slide(slide_set["tumour"]) as slide:
        assert slide.best_level(slide.downsample_for(Resolution(0.5, "mpp"))) == 1
        assert slide.best_level(slide.downsample_for(Resolution(0.75, "mpp"))) == 1  # downsample 3 -> level 1 (2)
        assert slide.best_level(slide.downsample_for(Resolution(0.25, "mpp"))) == 0
        assert slide.best_level(100.0) == 3


def test_magnification_converts_to_mpp_through_the_assumed_objective_power(slide_set):
    with open_slide(slide_set["tumour"]) as slide:  # 0.25 mpp without an objective power: 40x
        assert slide.mpp_of(Resolution(20, "power")) == pytest.approx(0.5)
        assert slide.mpp_of(Resolution(10, "power")) == pytest.approx(1.0)


def test_read_tile_resizes_the_region_to_the_tile_size(slide_set):
    with open_slide(slide_set["tumour"]) as slide:
        # Inside tissue A (pink): level 1 region of 64 px read at level-0 (640, 640) and resized to 32 px.
        tile = slide.read_tile(640, 640, 1, 64, 32)
        assert tile.shape == (32, 32, 3) and tile.dtype == np.uint8
        assert np.abs(tile.reshape(-1, 3).mean(0) - np.array(PINK)).max() < 4
        background = slide.read_tile(1536, 0, 1, 64, 64)
        assert background.min() >= 240


def test_slide_without_mpp_needs_slide_mpp(tmp_path):
    import tifffile

    path = tmp_path / "nompp.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.full((512, 512, 3), 255, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(ValueError, match=r"nompp\.tif.*--slide-mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_unreadable_and_missing_files_get_one_line_naming_them(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(ValueError, match=r"broken\.svs: OpenSlide cannot read") as error:
        open_slide(bad)
    assert "\n" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"absent\.tif"):
        open_slide(tmp_path / "absent.tif")


def test_missing_level_is_named(tmp_path):
    path = write_slide(tmp_path / "small.tif", [Shape("rect", TISSUE_A, PINK)], (1024, 1024), levels=2)
    with open_slide(path) as slide, pytest.raises(ValueError, match=r"small\.tif: level 5 does not exist"):
        slide.read_region((0, 0), 5, (8, 8))


def test_resolution_needs_known_units():
    with pytest.raises(ValueError, match="units"):
        Resolution(20, "x")  # type: ignore[arg-type]
    assert str(Resolution(0.5, "mpp")) == "0.5 mpp" and str(Resolution(20, "power")) == "20x"
