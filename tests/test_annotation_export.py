"""Slide predictions exported for QuPath (GeoJSON) and ASAP (XML): level-0 tile squares, classes, probabilities,
merged tumour regions; read back through shapely and through histotoken's own annotation reader."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import shape

from histotoken.data.wsi.annotations import read_annotations
from histotoken.engine.annotations_export import tumour_regions, write_annotation_export

SIZE = 128.0  # level-0 pixels of a 64 px tile at 0.5 mpp on a 0.25 mpp slide


def _table() -> pd.DataFrame:
    """Six tiles on a 3 x 2 grid: a high-tumour 2 x 1 pair on the left, one more on the right."""
    xs = [256, 384, 512, 256, 384, 512]
    ys = [256, 256, 256, 384, 384, 384]
    tumour = [0.9, 0.8, 0.1, 0.2, 0.3, 0.7]
    return pd.DataFrame({"slide": "s", "x": xs, "y": ys, "prob/normal": [1 - p for p in tumour], "prob/tumor": tumour})


def test_geojson_tiles_are_level0_squares_with_class_and_probabilities(tmp_path):
    table = _table()
    path = write_annotation_export(tmp_path, "s", table, SIZE, "geojson")
    assert path == tmp_path / "annotations" / "s.geojson"
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 6
    for feature, row in zip(data["features"], table.itertuples()):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        polygon = shape(feature["geometry"])
        assert polygon.is_valid and polygon.area == SIZE * SIZE
        assert polygon.bounds == (row.x, row.y, row.x + SIZE, row.y + SIZE)
        properties = feature["properties"]
        assert properties["objectType"] == "detection"
        assert properties["classification"]["name"] == ("Tumor" if row._5 > 0.5 else "Normal")
        assert len(properties["classification"]["color"]) == 3
        assert properties["measurements"]["probability tumor"] == pytest.approx(row._5)
        assert properties["measurements"]["probability normal"] == pytest.approx(row._4)


@pytest.mark.parametrize("export_format", ["geojson", "asap"])
def test_export_reads_back_through_histotoken_reader_as_the_tumour_tiles(tmp_path, export_format):
    table = _table()
    path = write_annotation_export(tmp_path, "s", table, SIZE, export_format)
    annotations = read_annotations(path)  # no label map: "Tumor" is tumour, "Normal" is ignored
    tumour_tiles = shapely.union_all(shapely.box(256, 256, 512, 384).union(shapely.box(512, 384, 640, 512)))
    assert annotations.region.symmetric_difference(tumour_tiles).area == 0
    assert annotations.region.area == 3 * SIZE * SIZE
    # the tile fractions histotoken computes from the file agree with the exported classes
    fractions = annotations.tumor_fractions(table["x"], table["y"], SIZE)
    np.testing.assert_array_equal(fractions, (table["prob/tumor"] > 0.5).astype(float))


def test_asap_xml_groups_tiles_by_class(tmp_path):
    path = write_annotation_export(tmp_path, "s", _table(), SIZE, "asap")
    root = ElementTree.parse(path).getroot()
    assert sorted(g.get("Name") for g in root.iter("Group")) == ["Normal", "Tumor"]
    groups = [a.get("PartOfGroup") for a in root.iter("Annotation")]
    assert groups == ["Tumor", "Tumor", "Normal", "Normal", "Normal", "Tumor"]
    first = [(float(c.get("X")), float(c.get("Y"))) for c in next(root.iter("Annotation")).iter("Coordinate")]
    assert first == [(256, 256), (384, 256), (384, 384), (256, 384)]


def test_a_2x2_block_of_high_tiles_merges_into_one_region_of_four_tiles():
    xs = [0, 128, 0, 128, 384, 512]  # a 2 x 2 block, then a lone tile two columns away
    ys = [0, 0, 128, 128, 0, 128]  # ... and one touching it only at a corner
    probability = [0.9, 0.6, 0.95, 0.5, 0.8, 0.7]
    regions = tumour_regions(xs, ys, SIZE, probability, threshold=0.5)
    assert len(regions) == 3
    assert regions[0].equals(shapely.box(0, 0, 256, 256)) and regions[0].area == 4 * SIZE * SIZE
    assert [r.area for r in regions[1:]] == [SIZE * SIZE, SIZE * SIZE]  # corner contact does not merge
    # below the threshold a tile leaves the region: three tiles of the block remain, as one L shape
    regions = tumour_regions(xs[:4], ys[:4], SIZE, probability[:4], threshold=0.55)
    assert len(regions) == 1 and regions[0].area == 3 * SIZE * SIZE


def test_regions_are_annotations_the_reader_leaves_out_without_a_label_map(tmp_path):
    table = _table()
    path = write_annotation_export(tmp_path, "s", table, SIZE, "geojson", table["prob/tumor"], 0.5, regions=True)
    features = json.loads(path.read_text())["features"]
    regions = [f for f in features if f["properties"]["objectType"] == "annotation"]
    assert [f["properties"]["classification"]["name"] for f in regions] == ["Tumor region", "Tumor region"]
    assert sorted(shape(f["geometry"]).area for f in regions) == [SIZE * SIZE, 2 * SIZE * SIZE]
    mapped = read_annotations(path, {"tumor region": "tumor", "tumor": "ignore"})
    assert mapped.tumor.area == 3 * SIZE * SIZE  # the regions alone cover the three high tiles


def test_an_unknown_export_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="geojson, asap"):
        write_annotation_export(tmp_path, "s", _table(), SIZE, "svg")


def test_predict_refuses_regions_without_an_export_format(tmp_path, capsys):
    from histotoken.cli.main import main

    assert main(["predict", str(tmp_path / "run"), str(tmp_path / "slide.tif"), "--export-regions"]) == 2
    assert "add --export-annotations geojson|asap" in capsys.readouterr().err
