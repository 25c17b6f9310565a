"""Tiling the generated slides: exact coordinates, tissue and tumour fractions, labels; resume; failures."""

from __future__ import annotations

import pandas as pd
import pytest

from histotoken import formats
from histotoken.cli.main import main
from histotoken.data.wsi.reader import Resolution, open_slide
from histotoken.data.wsi.tiling import TilingSettings, slide_jobs, tile_grid, tile_slides
from tests.slide_fixture import (
    NORMAL_SLIDE,
    TILE_SIZE,
    TISSUE_TILES,
    TUMOR_SLIDE,
    TUMOR_TILES,
    shared_slide_set,
)

SETTINGS = TilingSettings(tile_size=TILE_SIZE, resolution=Resolution(0.5, "mpp"))


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


@pytest.fixture(scope="module")
def tiled(slide_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles")
    jobs = slide_jobs([slide_set["tumour"], slide_set["normal"]], slide_set["annotations"], slide_set["labels"])
    summary = tile_slides(jobs, out, SETTINGS, workers=2)
    return out, summary


def _by_corner(table: pd.DataFrame, column: str) -> dict[tuple[int, int], object]:
    return {(int(x), int(y)): value for x, y, value in zip(table["x"], table["y"], table[column])}


def test_grid_spans_the_slide_at_the_target_mpp(slide_set):
    with open_slide(slide_set["normal"]) as slide:
        grid = tile_grid(slide, SETTINGS)
        assert (grid.level, grid.read_size, grid.size) == (1, 64, 128.0)
        assert len(grid.xs) == 16 * 12 and grid.xs.max() == 2048 - 128 and grid.ys.max() == 1536 - 128
        overlapping = tile_grid(slide, TilingSettings(tile_size=64, overlap=32))
        assert len(overlapping.xs) == 31 * 23  # stride 64 level-0 pixels
        coarse = tile_grid(slide, TilingSettings(tile_size=64, resolution=Resolution(10, "power")))
        assert (coarse.level, coarse.read_size, coarse.size) == (2, 64, 256.0)  # 1 mpp from level 2 (1 mpp)


def test_kept_tiles_and_tissue_fractions_are_exact(tiled):
    out, _ = tiled
    for slide in (TUMOR_SLIDE, NORMAL_SLIDE):
        table = pd.read_parquet(formats.TilePaths(out).table(slide))
        assert _by_corner(table, "tissue_fraction") == pytest.approx(TISSUE_TILES)
        assert list(table.columns) == list(formats.TILE_COLUMNS)
        assert set(table["level"]) == {1} and set(table["read_size"]) == {64} and set(table["mpp"]) == {0.5}


def test_tumour_fractions_and_labels_follow_the_asap_polygons(tiled):
    out, _ = tiled
    table = pd.read_parquet(formats.TilePaths(out).table(TUMOR_SLIDE))
    expected = {corner: TUMOR_TILES.get(corner, 0.0) for corner in TISSUE_TILES}
    assert _by_corner(table, "tumor_fraction") == pytest.approx(expected)
    tumour = {corner for corner, label in _by_corner(table, "label").items() if label == "tumor"}
    assert tumour == set(TUMOR_TILES)  # fractions 0.5 reach the default --min-tumor-fraction 0.5
    assert set(table["slide_label"]) == {"tumor"} and set(table["patient_id"]) == {"patient_001"}


def test_normal_slide_without_annotations_has_normal_tiles(tiled):
    out, _ = tiled
    table = pd.read_parquet(formats.TilePaths(out).table(NORMAL_SLIDE))
    assert set(table["label"]) == {"normal"} and (table["tumor_fraction"] == 0).all()
    assert set(table["patient_id"]) == {"patient_002"}


def test_summary_thumbnails_and_settings_are_written(tiled):
    out, summary = tiled
    paths = formats.TilePaths(out)
    on_disk = pd.read_csv(paths.summary)
    assert list(on_disk.columns) == list(formats.TILE_SUMMARY_COLUMNS)
    assert dict(zip(on_disk["slide"], on_disk["n_tiles"])) == {TUMOR_SLIDE: 28, NORMAL_SLIDE: 28}
    assert dict(zip(on_disk["slide"], on_disk["n_tumor_tiles"])) == {TUMOR_SLIDE: 7, NORMAL_SLIDE: 0}
    tissue_a_and_b = (512 * 512 + 448 * 384) / (2048 * 1536)  # drawn tissue share of the slide
    assert on_disk["tissue_fraction"].tolist() == pytest.approx([tissue_a_and_b] * 2, abs=1e-4)
    from PIL import Image

    with Image.open(paths.thumbnail(TUMOR_SLIDE)) as picture:
        assert picture.size == (64, 48)  # the slide at the mask resolution, 8 um per pixel
    assert formats.is_tile_folder(out)


def test_geojson_with_a_label_map_gives_the_same_labels(slide_set, tmp_path):
    jobs = slide_jobs([slide_set["tumour"]], slide_set["geojson"], label_map={"carcinoma": "tumor"})
    tile_slides(jobs, tmp_path, SETTINGS)
    table = pd.read_parquet(formats.TilePaths(tmp_path).table(TUMOR_SLIDE))
    expected = {corner: TUMOR_TILES.get(corner, 0.0) for corner in TISSUE_TILES}
    assert _by_corner(table, "tumor_fraction") == pytest.approx(expected)


def test_higher_min_tumor_fraction_drops_half_covered_tiles(slide_set, tmp_path):
    settings = TilingSettings(tile_size=TILE_SIZE, min_tumor_fraction=0.8)
    tile_slides(slide_jobs([slide_set["tumour"]], slide_set["annotations"]), tmp_path, settings)
    table = pd.read_parquet(formats.TilePaths(tmp_path).table(TUMOR_SLIDE))
    tumour = {corner for corner, label in _by_corner(table, "label").items() if label == "tumor"}
    assert tumour == {(384, 256), (256, 384), (384, 384)}


def test_finished_slides_are_skipped_and_bad_slides_reported(slide_set, tmp_path, capsys):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"garbage")
    out = tmp_path / "tiles"
    argv = ["tile", str(slide_set["normal"]), str(bad), "--out", str(out), "--tile-size", str(TILE_SIZE)]
    assert main(argv) == 1  # one slide failed, the other was tiled
    printed = capsys.readouterr().out
    assert "1 of 2 slides tiled: 28 tiles" in printed and "broken.svs: OpenSlide cannot read" in printed
    table_path = formats.TilePaths(out).table(NORMAL_SLIDE)
    stamp = table_path.stat().st_mtime_ns
    assert main(argv) == 1
    assert table_path.stat().st_mtime_ns == stamp  # not redone
    summary = pd.read_csv(formats.TilePaths(out).summary)
    assert dict(zip(summary["slide"], summary["status"])) == {NORMAL_SLIDE: "done", "broken": "failed"}
    with pytest.raises(ValueError, match="other settings"):
        tile_slides(slide_jobs([slide_set["normal"]]), out, TilingSettings(tile_size=32))
