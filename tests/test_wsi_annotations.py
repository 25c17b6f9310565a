"""Annotation polygons, tile tumour fractions, label maps, slide labels and patient ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histotoken.data.wsi.annotations import parse_label_map, read_annotations, read_asap_xml, read_geojson
from histotoken.data.wsi.labels import patient_from_name, read_slide_labels


def _asap(path, polygons):
    body = "".join(
        f'<Annotation Name="a{i}" Type="Polygon" PartOfGroup="{group}"><Coordinates>'
        + "".join(f'<Coordinate Order="{k}" X="{x}" Y="{y}" />' for k, (x, y) in enumerate(points))
        + "</Coordinates></Annotation>"
        for i, (group, points) in enumerate(polygons)
    )
    path.write_text(f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>")
    return path


def test_triangle_covers_half_of_the_tile_on_its_diagonal(tmp_path):
    annotations = read_asap_xml(_asap(tmp_path / "a.xml", [("_0", [(0, 0), (100, 0), (100, 100)])]))
    fractions = annotations.tumor_fractions(np.array([0, 100, 50]), np.array([0, 0, 0]), 100)
    # The last box (x 50..150) holds the triangle part under y <= x for x in 50..100: (100² - 50²) / 2 = 3750.
    np.testing.assert_allclose(fractions, [0.5, 0.0, 0.375])


def test_exclusions_are_cut_out_of_tumour_and_groups_1_count_as_tumour(tmp_path):
    polygons = [("_0", [(0, 0), (100, 0), (100, 100), (0, 100)]),
                ("_1", [(200, 0), (300, 0), (300, 100), (200, 100)]),
                ("_2", [(0, 0), (100, 0), (100, 50), (0, 50)]),
                ("Other", [(400, 0), (500, 0), (500, 100), (400, 100)])]
    annotations = read_asap_xml(_asap(tmp_path / "a.xml", polygons))
    fractions = annotations.tumor_fractions(np.array([0, 200, 400]), np.zeros(3), 100)
    np.testing.assert_allclose(fractions, [0.5, 1.0, 0.0])


def test_self_intersecting_outline_is_repaired_not_dropped(tmp_path):
    bow_tie = [("_0", [(0, 0), (100, 100), (100, 0), (0, 100)])]  # two triangles meeting at (50, 50)
    annotations = read_asap_xml(_asap(tmp_path / "a.xml", bow_tie))
    assert annotations.tumor.area == pytest.approx(5000.0)
    np.testing.assert_allclose(annotations.tumor_fractions(np.array([0]), np.array([0]), 100), [0.5])


def test_geojson_classes_map_through_the_label_map(tmp_path):
    def feature(geometry, classification):
        return {"type": "Feature", "geometry": geometry, "properties": {"classification": classification}}

    square = {"type": "Polygon", "coordinates": [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]}
    multi = {"type": "MultiPolygon", "coordinates": [[[[200, 0], [300, 0], [300, 50], [200, 50], [200, 0]]]]}
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps([feature(square, {"name": "Carcinoma"}), feature(multi, "Tumor")]))
    unmapped = read_geojson(path)  # "Tumor" is understood by default; "Carcinoma" is not
    mapped = read_annotations(path, parse_label_map("Carcinoma=tumor"))
    xs, ys = np.array([0, 200]), np.zeros(2)
    np.testing.assert_allclose(unmapped.tumor_fractions(xs, ys, 100), [0.0, 0.5])
    np.testing.assert_allclose(mapped.tumor_fractions(xs, ys, 100), [1.0, 0.5])


def test_label_map_parsing_and_errors():
    assert parse_label_map("Tumor=tumor, Ignore=exclude") == {"tumor": "tumor", "ignore": "exclude"}
    with pytest.raises(ValueError, match="NAME=LABEL"):
        parse_label_map("Tumor")
    with pytest.raises(ValueError, match="unknown annotation format"):
        read_annotations("slide.csv")


def test_camelyon16_reference_csv_without_header(tmp_path):
    path = tmp_path / "reference.csv"
    path.write_text("test_001,Tumor,Macro,Primary\ntest_002,Normal,,\n")
    labels = read_slide_labels(path)
    assert labels.to_dict("index") == {"test_001": {"label": "tumor", "patient_id": "test_001"},
                                       "test_002": {"label": "normal", "patient_id": "test_002"}}


def test_camelyon17_stages_and_patient_names(tmp_path):
    path = tmp_path / "stages.csv"
    path.write_text("patient,stage\npatient_004.zip,pN1\npatient_004_node_4.tif,negative\npatient_004_node_1.tif,itc\n")
    labels = read_slide_labels(path)
    assert dict(labels["label"]) == {"patient_004_node_4": "normal", "patient_004_node_1": "tumor"}
    assert set(labels["patient_id"]) == {"patient_004"}
    assert patient_from_name("patient_017_node_2") == "patient_017" and patient_from_name("tumor_001") == "tumor_001"


def test_patient_column_wins_and_bad_labels_are_named(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide,label,patient_id\na,1,P1\nb,0,P1\n")
    assert list(read_slide_labels(path)["patient_id"]) == ["P1", "P1"]
    path.write_text("slide,label\na,maybe\n")
    with pytest.raises(ValueError, match=r"labels\.csv: slide label 'maybe'"):
        read_slide_labels(path)
