"""Lazy tile reads: pixels match the slide, one handle per process, labels become targets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from histotoken import formats
from histotoken.data.wsi import dataset as tile_dataset
from histotoken.data.wsi.dataset import TileDataset, read_tile
from histotoken.data.wsi.reader import Resolution
from histotoken.data.wsi.tiling import TilingSettings, read_tile_tables, slide_jobs, tile_slides
from tests.slide_fixture import PINK, PURPLE, TILE_SIZE, TUMOR_SLIDE, shared_slide_set


@pytest.fixture(scope="session")
def slide_set(tmp_path_factory):
    return shared_slide_set(tmp_path_factory)


@pytest.fixture(scope="module")
def table(slide_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiles")
    jobs = slide_jobs([slide_set["tumour"], slide_set["normal"]], slide_set["annotations"], slide_set["labels"])
    tile_slides(jobs, out, TilingSettings(tile_size=TILE_SIZE, resolution=Resolution(0.5, "mpp")))
    return read_tile_tables(out)


def test_read_tile_returns_channels_first_pixels_of_the_region(slide_set):
    tumour = read_tile(slide_set["tumour"], 384, 384, 1, 64, 64)  # inside the purple tumour
    tissue = read_tile(slide_set["tumour"], 640, 640, 1, 64, 32)  # pink tissue, resized
    assert tumour.shape == (3, 64, 64) and tumour.dtype == torch.uint8 and tissue.shape == (3, 32, 32)
    assert np.abs(tumour.reshape(3, -1).float().mean(1).numpy() - PURPLE).max() < 4
    assert np.abs(tissue.reshape(3, -1).float().mean(1).numpy() - PINK).max() < 4


def test_read_tile_takes_a_table_row_alone(table):
    from histotoken.data import wsi

    row = table.iloc[3]
    by_row = wsi.read_tile(row)
    by_columns = read_tile(row["slide_path"], row["x"], row["y"], row["level"], row["read_size"], row["tile_size"])
    assert by_row.shape == (3, TILE_SIZE, TILE_SIZE)
    torch.testing.assert_close(by_row, by_columns, rtol=0, atol=0)


def test_dataset_targets_follow_tile_labels(table):
    data = TileDataset(table, formats.TILE_CLASS_NAMES)
    assert len(data) == 56
    expected = (table["label"] == "tumor").astype(int).to_numpy()
    np.testing.assert_array_equal(data.targets.numpy(), expected)
    image, target = data[int(np.flatnonzero(expected)[0])]
    assert image.shape == (3, TILE_SIZE, TILE_SIZE) and image.dtype == torch.uint8 and int(target) == 1


def test_unknown_labels_get_target_minus_one_and_foreign_labels_fail(table):
    unlabelled = table.assign(label="")
    assert (TileDataset(unlabelled, formats.TILE_CLASS_NAMES).targets == -1).all()
    with pytest.raises(ValueError, match="not in the classes"):
        TileDataset(table.assign(label="stroma"), formats.TILE_CLASS_NAMES)


def test_image_size_and_transform_apply(table):
    data = TileDataset(table, formats.TILE_CLASS_NAMES, transform=lambda image: image.float() / 255, image_size=32)
    image, _ = data[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and image.max() <= 1


def test_workers_read_the_same_pixels_as_the_main_process(table):
    subset = table.iloc[::7].reset_index(drop=True)
    data = TileDataset(subset, formats.TILE_CLASS_NAMES)
    in_process = torch.stack([data[i][0] for i in range(len(data))])
    loader = DataLoader(data, batch_size=4, num_workers=2)
    from_workers = torch.cat([images for images, _ in loader])
    torch.testing.assert_close(from_workers, in_process, rtol=0, atol=0)


def test_handles_are_opened_once_per_process_and_path(slide_set):
    read_tile(slide_set["normal"], 0, 0, 1, 16, 16)
    read_tile(slide_set["normal"], 128, 0, 1, 16, 16)
    import os

    mine = [key for key in tile_dataset._handles if key[0] == os.getpid() and key[1] == str(slide_set["normal"])]
    assert len(mine) == 1


def test_tile_tables_concatenate_every_slide(table):
    assert set(table["slide"]) == {TUMOR_SLIDE, "patient_002_node_1"}
    assert isinstance(table, pd.DataFrame) and list(table.columns) == list(formats.TILE_COLUMNS)
