"""Slide predictions as annotations a slide viewer opens: QuPath GeoJSON and ASAP XML.

Each scored tile becomes a square polygon in slide level-0 pixels (origin at the top-left corner of the
full-resolution image, as QuPath and ASAP both use), classified by the model's predicted class and
carrying the class probabilities. Optionally, tumour regions: the union (shapely ``union_all``) of the
tiles whose tumour probability reaches the threshold, one polygon per connected region.

- QuPath GeoJSON (File > Import objects): a ``FeatureCollection`` of ``Feature`` objects with a ``Polygon``
  geometry and ``properties.objectType`` (``"detection"`` for tiles, so that QuPath lists their
  measurements; ``"annotation"`` for regions), ``properties.classification`` ``{"name", "color": [r, g, b]}``
  and ``properties.measurements`` ``{name: value}`` (QuPath 0.4+'s map form).
- ASAP XML (CAMELYON16 layout): ``<Annotation Type="Polygon" PartOfGroup=CLASS>`` with ``<Coordinate Order X Y>``,
  and one ``<Group>`` per class under ``<AnnotationGroups>``; ASAP has no measurements, so a tile's
  probabilities go into its ``Name``, and no holes, so a region is written as its outer ring.

Class names are written with a capital first letter (``Tumor``: QuPath's built-in tumour class); histotoken's
own reader (:mod:`histotoken.data.wsi.annotations`) reads both files back, tumour by that name.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from histotoken import formats
from histotoken.io import atomic_write_text

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("geojson", "asap")
EXPORT_SUFFIXES = {"geojson": ".geojson", "asap": ".xml"}
ANNOTATIONS_EXPORT_DIR = "annotations"  # OUT/annotations/<slide>.geojson or .xml
REGION_CLASS = "Tumor region"
# QuPath's own colour for Tumor; others in a fixed order.
CLASS_COLOURS = {"tumor": (200, 0, 0), "tumour": (200, 0, 0), "malignant": (200, 0, 0), "normal": (0, 90, 255),
                 "benign": (0, 90, 255)}
OTHER_COLOURS = ((0, 150, 0), (150, 0, 150), (200, 150, 0), (0, 150, 150))
REGION_COLOUR = (255, 200, 0)


def viewer_class_name(name: str) -> str:
    """A run's class name as a viewer class: ``tumor`` -> ``Tumor`` (QuPath's built-in tumour class)."""
    return name[:1].upper() + name[1:]


def class_colour(name: str, index: int) -> tuple[int, int, int]:
    return CLASS_COLOURS.get(name.lower(), OTHER_COLOURS[index % len(OTHER_COLOURS)])


def probability_columns(table: pd.DataFrame) -> list[str]:
    """The ``prob/<class>`` columns of a predicted tile table, in the run's class order."""
    columns = [c for c in table.columns if str(c).startswith(formats.PROBABILITY_PREFIX)]
    if not columns:
        raise ValueError("the tile table has no prob/<class> columns; export tiles scored by `histotoken predict`")
    return columns


def tile_squares(xs: Sequence[float], ys: Sequence[float], size: float) -> list[list[list[float]]]:
    """Closed rings (5 points, clockwise in image coordinates) of level-0 squares with top-left (x, y)."""
    rings = []
    for x, y in zip(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)):
        rings.append([[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]])
    return rings


def tumour_regions(xs: Sequence[float], ys: Sequence[float], size: float, probability: Sequence[float],
                   threshold: float) -> list:
    """Connected regions (shapely Polygons) of the tiles with tumour probability >= ``threshold``.

    Tiles that share an edge merge into one polygon; tiles that touch only at a corner stay apart.
    """
    import shapely

    xs, ys, probability = (np.asarray(v, dtype=float) for v in (xs, ys, probability))
    high = probability >= threshold
    if not high.any():
        return []
    boxes = shapely.box(xs[high], ys[high], xs[high] + size, ys[high] + size)  # (H,)
    merged = shapely.union_all(boxes)
    parts = []
    for part in shapely.get_parts(merged):
        # squares meeting at one corner union into a single polygon with a pinch point; split them
        parts.extend(p for p in shapely.get_parts(shapely.make_valid(part)) if p.geom_type == "Polygon")
    return sorted(parts, key=lambda p: (p.bounds[1], p.bounds[0]))


def _rings(polygon) -> list[list[list[float]]]:
    return [[list(map(float, point)) for point in ring.coords] for ring in (polygon.exterior, *polygon.interiors)]


def qupath_geojson(table: pd.DataFrame, size: float, regions: Sequence = ()) -> dict:
    """A QuPath GeoJSON FeatureCollection: one detection per tile, one annotation per region."""
    columns = probability_columns(table)
    names = [c[len(formats.PROBABILITY_PREFIX):] for c in columns]
    probabilities = table[columns].to_numpy(dtype=float)  # (N, C)
    predicted = probabilities.argmax(axis=1) if len(table) else np.zeros(0, dtype=int)
    features = []
    for ring, row, index in zip(tile_squares(table["x"], table["y"], size), probabilities, predicted):
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": {"name": viewer_class_name(names[index]), "color": list(class_colour(names[index], index))},
                "measurements": {f"probability {name}": float(value) for name, value in zip(names, row)},
            },
        })
    for polygon in regions:
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": _rings(polygon)},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": REGION_CLASS, "color": list(REGION_COLOUR)},
                "measurements": {"area px^2": float(polygon.area)},
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _hex(colour: tuple[int, int, int]) -> str:
    return "#{:02X}{:02X}{:02X}".format(*colour)


def asap_xml(table: pd.DataFrame, size: float, regions: Sequence = ()) -> str:
    """ASAP XML: one Polygon annotation per tile in the group of its predicted class (+ regions)."""
    columns = probability_columns(table)
    names = [c[len(formats.PROBABILITY_PREFIX):] for c in columns]
    probabilities = table[columns].to_numpy(dtype=float)  # (N, C)
    root = ElementTree.Element("ASAP_Annotations")
    annotations = ElementTree.SubElement(root, "Annotations")

    def add(name: str, group: str, colour, ring) -> None:
        element = ElementTree.SubElement(annotations, "Annotation", Name=name, Type="Polygon", PartOfGroup=group,
                                         Color=_hex(colour))
        coordinates = ElementTree.SubElement(element, "Coordinates")
        for order, (x, y) in enumerate(ring[:-1]):  # ASAP rings are implicitly closed
            ElementTree.SubElement(coordinates, "Coordinate", Order=str(order), X=repr(float(x)), Y=repr(float(y)))

    rings = tile_squares(table["x"], table["y"], size)
    for number, (ring, row) in enumerate(zip(rings, probabilities)):
        index = int(row.argmax())
        scores = ", ".join(f"{name} {value:.3f}" for name, value in zip(names, row))
        add(f"tile {number} ({scores})", viewer_class_name(names[index]), class_colour(names[index], index), ring)
    for number, polygon in enumerate(regions):
        add(f"region {number}", REGION_CLASS, REGION_COLOUR, _rings(polygon)[0])
    groups = ElementTree.SubElement(root, "AnnotationGroups")
    for index, name in enumerate(names):
        group = ElementTree.SubElement(groups, "Group", Name=viewer_class_name(name), PartOfGroup="None",
                                       Color=_hex(class_colour(name, index)))
        ElementTree.SubElement(group, "Attributes")
    if len(regions):
        group = ElementTree.SubElement(groups, "Group", Name=REGION_CLASS, PartOfGroup="None", Color=_hex(REGION_COLOUR))
        ElementTree.SubElement(group, "Attributes")
    ElementTree.indent(root)
    return '<?xml version="1.0"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def write_annotation_export(
    out_dir: str | Path, slide: str, table: pd.DataFrame, size: float, export_format: str,
    tumor_probability: Sequence[float] | None = None, threshold: float = 0.5, regions: bool = False,
) -> Path:
    """OUT/annotations/<slide>.geojson (QuPath) or .xml (ASAP): the slide's tiles (level-0 squares of ``size``
    pixels) with their predicted class and probabilities; with ``regions``, tumour regions of the tiles whose
    ``tumor_probability`` reaches ``threshold``."""
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--export-annotations must be one of {', '.join(EXPORT_FORMATS)}, not {export_format!r}")
    merged = []
    if regions:
        if tumor_probability is None:
            raise ValueError("tumour regions need the tiles' tumour probabilities")
        merged = tumour_regions(table["x"], table["y"], size, tumor_probability, threshold)
    path = Path(out_dir) / ANNOTATIONS_EXPORT_DIR / f"{slide}{EXPORT_SUFFIXES[export_format]}"
    if export_format == "geojson":
        text = json.dumps(qupath_geojson(table, size, merged))
    else:
        text = asap_xml(table, size, merged)
    atomic_write_text(path, text)
    logger.info("wrote %s (%d tiles, %d regions)", path, len(table), len(merged))
    return path
