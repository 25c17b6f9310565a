"""Tumour and exclusion polygons from CAMELYON16 ASAP XML or QuPath GeoJSON, and tile tumour fractions.

- ASAP XML (CAMELYON16/17): ``<Annotation PartOfGroup="_0">`` with ``<Coordinate X= Y=>`` in level-0
  pixels; groups ``_0`` and ``_1`` (and ``Tumor``, ``metastases``) are tumour, ``_2`` (and ``Exclusion``)
  are regions to leave out of the tumour (normal tissue inside a tumour outline).
- QuPath GeoJSON export: features with Polygon/MultiPolygon geometry in level-0 pixels, classified by
  ``properties.classification.name``; a label map (``--label-map Tumor=tumor,Ignore=exclude``) turns
  class names into ``tumor`` or ``exclude`` (other labels are read and ignored).

A tile's tumour fraction is the share of its area inside tumour polygons and outside exclusions, computed
with shapely 2's vectorised functions: an STRtree finds the (tile, polygon) pairs that meet, and only those
intersections are computed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TUMOR = "tumor"
EXCLUDE = "exclude"
ASAP_TUMOR_GROUPS = frozenset({"_0", "_1", "tumor", "metastases"})
ASAP_EXCLUDE_GROUPS = frozenset({"_2", "exclusion"})
# QuPath class names understood without a --label-map (matched case-insensitively).
DEFAULT_LABEL_MAP = {"tumor": TUMOR, "tumour": TUMOR, "metastasis": TUMOR, "exclusion": EXCLUDE, "ignore": EXCLUDE}
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


@dataclasses.dataclass
class Annotations:
    """Tumour region (tumour polygons minus exclusions) of one slide, as a shapely geometry in level-0 pixels."""

    tumor: object  # shapely geometry (possibly empty)
    exclusion: object
    source: Path | None = None

    @property
    def region(self):
        return self.tumor.difference(self.exclusion)

    def tumor_fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Share of each level-0 square (x, y, size) inside the tumour region, in [0, 1]."""
        import shapely

        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        fractions = np.zeros(len(xs), dtype=np.float64)
        parts = shapely.get_parts(self.region)  # disjoint polygons: their intersection areas add up
        parts = parts[~shapely.is_empty(parts)] if len(parts) else parts
        if len(xs) == 0 or len(parts) == 0:
            return fractions
        boxes = shapely.box(xs, ys, xs + size, ys + size)  # (N,)
        tile_index, part_index = shapely.STRtree(parts).query(boxes, predicate="intersects")  # (2, P) pairs
        areas = shapely.area(shapely.intersection(boxes[tile_index], parts[part_index]))  # (P,)
        fractions += np.bincount(tile_index, weights=areas, minlength=len(xs))
        return np.clip(fractions / (size * size), 0.0, 1.0)


def _union(polygons: list):
    import shapely

    if not polygons:
        return shapely.Polygon()
    return shapely.union_all([shapely.make_valid(polygon) for polygon in polygons])  # drawn outlines may self-intersect


def _polygonal(geometry):
    """Keep the polygon parts of a geometry (make_valid can add stray lines)."""
    import shapely

    parts = [p for p in shapely.get_parts(geometry) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


def read_asap_xml(path: str | Path) -> Annotations:
    """CAMELYON16 ASAP XML: tumour polygons in groups ``_0``/``_1``, exclusions in ``_2``."""
    import shapely

    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not a readable ASAP XML annotation file ({error})") from None
    tumor, exclusion = [], []
    for number, annotation in enumerate(root.iter("Annotation"), 1):
        group = (annotation.get("PartOfGroup") or "").strip().lower()
        try:
            points = [
                (float(c.get("X")), float(c.get("Y")))
                for c in sorted(annotation.iter("Coordinate"), key=lambda c: int(float(c.get("Order", 0))))
            ]
        except (TypeError, ValueError):
            raise ValueError(f"{path}: annotation {number} ({annotation.get('Name', 'unnamed')!r}) has a Coordinate "
                             "without numeric X, Y and Order attributes; fix or remove it") from None
        kind = (annotation.get("Type") or "Polygon").lower()
        if len(points) < 3 or kind in ("dot", "pointset"):
            continue
        polygon = shapely.Polygon(points)
        if group in ASAP_TUMOR_GROUPS:
            tumor.append(polygon)
        elif group in ASAP_EXCLUDE_GROUPS:
            exclusion.append(polygon)
        else:
            logger.debug("%s: annotation group %r is neither tumour nor exclusion; ignored", path, group)
    return Annotations(_polygonal(_union(tumor)), _polygonal(_union(exclusion)), path)


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"Tumor=tumor,Other=exclude"`` -> ``{"tumor": "tumor", "other": "exclude"}`` (names lower-cased)."""
    if not text:
        return {}
    mapping = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, label = item.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise ValueError(f"--label-map: {item!r} is not NAME=LABEL (e.g. --label-map Tumor=tumor,Ignore=exclude)")
        mapping[name.strip().lower()] = label.strip().lower()
    return mapping


def _classification(properties: Mapping) -> str:
    value = properties.get("classification")
    if isinstance(value, Mapping):
        value = value.get("name")
    if value is None:
        value = properties.get("name", "")
    return str(value).strip().lower()


def _kind(value: object) -> str:
    """How a JSON value is named in an error: 'a list', 'a number', 'text', ..."""
    names = {list: "a list", dict: "an object", str: "text", int: "a number", float: "a number", bool: "true/false"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _geometry(path: Path, number: int, geometry: Mapping):
    """The shapely geometry of feature ``number``, or a plain-words error naming the file and the feature."""
    import shapely

    try:
        return shapely.from_geojson(json.dumps(geometry))
    except (shapely.errors.GEOSException, ValueError, TypeError) as error:
        text = str(error)
        if "closed linestring" in text or "LinearRing" in text:
            reason = "a polygon ring is not closed (its last point must repeat its first)"
        elif "at least 4" in text or "at least 3" in text or "IllegalArgument" in text:
            reason = "a polygon ring has too few points (a closed ring needs at least 4)"
        else:
            reason = "its coordinates are not a valid GeoJSON Polygon or MultiPolygon (lists of [x, y] rings)"
        raise ValueError(f"{path}: feature {number}: {reason}") from None


def read_geojson(path: str | Path, label_map: Mapping[str, str] | None = None) -> Annotations:
    """QuPath GeoJSON: polygons whose class name maps (``label_map``, then defaults) to ``tumor`` or ``exclude``."""

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable GeoJSON annotation file ({error})") from None
    features = data.get("features", [data]) if isinstance(data, dict) else data
    if not isinstance(features, list):
        raise ValueError(f"{path}: 'features' must be a list of GeoJSON Feature objects, not {_kind(features)}")
    mapping = {**DEFAULT_LABEL_MAP, **{k.lower(): v for k, v in (label_map or {}).items()}}
    tumor, exclusion, unmapped = [], [], set()
    for number, feature in enumerate(features, 1):
        if not isinstance(feature, dict):
            raise ValueError(f"{path}: feature {number} is {_kind(feature)}, not a GeoJSON Feature object "
                             '({"type": "Feature", "geometry": ..., "properties": ...})')
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        properties = feature.get("properties")
        name = _classification(properties if isinstance(properties, dict) else {})
        label = mapping.get(name)
        shape = _geometry(path, number, geometry)
        if label == TUMOR:
            tumor.append(shape)
        elif label == EXCLUDE:
            exclusion.append(shape)
        else:
            unmapped.add(name)
    if unmapped:
        logger.info("%s: classes %s are neither tumour nor exclusion (map them with --label-map NAME=tumor)",
                    path, sorted(unmapped))
    return Annotations(_polygonal(_union(tumor)), _polygonal(_union(exclusion)), path)


def read_annotations(path: str | Path, label_map: Mapping[str, str] | None = None) -> Annotations:
    """ASAP XML (.xml) or QuPath GeoJSON (.geojson, .json) by suffix."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return read_asap_xml(path)
    if path.suffix.lower() in (".geojson", ".json"):
        return read_geojson(path, label_map)
    raise ValueError(f"{path}: unknown annotation format; use ASAP .xml or QuPath .geojson")


def find_annotation_file(directory: str | Path | None, slide: str) -> Path | None:
    """DIR/<slide>.xml, .geojson or .json, the first that exists (None without a directory or a file)."""
    if directory is None:
        return None
    for suffix in ANNOTATION_SUFFIXES:
        candidate = Path(directory) / f"{slide}{suffix}"
        if candidate.exists():
            return candidate
    return None
