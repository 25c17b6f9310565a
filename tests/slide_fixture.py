"""Generated pyramidal TIFF slides with known tissue, tumour, pen marks and matching annotations.

Level 0 is 2048 x 1536 pixels at 0.25 microns per pixel, tiled 256 x 256, with levels at downsamples
1, 2, 4 and 8 (the reduced ones written as ``subfiletype=1`` pages). Tiled at 0.5 mpp with 64 px tiles,
a tile spans 128 level-0 pixels (a 16 x 12 grid); the tissue mask comes from the downsample-8 level,
where one mask pixel is 8 level-0 pixels, so every edge below falls on a mask pixel boundary and the
tissue and tumour fractions are exact:

- tissue A: (256, 256)-(768, 768), 4 x 4 whole tiles, tissue fraction 1;
- tissue B: (1024, 896)-(1472, 1280): columns x = 1024, 1152, 1280 whole, x = 1408 half (fraction 0.5),
  rows y = 896, 1024, 1152;
- a tissue speck of 16 x 16 level-0 pixels at (1792, 192), which the clean-up removes;
- a blue pen stroke along y = 1400 and a green one along x = 1900 on the background;
- tumour (slide "tumour" only, drawn purple): (256, 256)-(576, 512) in group ``_0`` minus an exclusion
  (group ``_2``) (256, 256)-(320, 320), and (1024, 1024)-(1088, 1152) in group ``_1``. Tumour fractions:
  tiles (256, 256) 0.75, (384, 256), (256, 384), (384, 384) 1, (512, 256), (512, 384) 0.5, (1024, 1024) 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histotoken.data.wsi.synthetic import Shape, write_slide

SIZE = (2048, 1536)
MPP = 0.25
PINK = (230, 150, 200)  # eosin-rich tissue
PURPLE = (120, 60, 160)  # haematoxylin-dense tumour
BLUE_PEN = (30, 60, 200)
GREEN_PEN = (40, 170, 60)

TISSUE_A = (256, 256, 768, 768)
TISSUE_B = (1024, 896, 1472, 1280)
SPECK = (1792, 192, 1808, 208)
TUMOR_0 = (256, 256, 576, 512)
EXCLUSION_2 = (256, 256, 320, 320)
TUMOR_1 = (1024, 1024, 1088, 1152)

TILE_SIZE = 64  # at 0.5 mpp: 128 level-0 pixels
TILE_SPAN = 128
# Kept tiles (level-0 top-left corners) -> tissue fraction, on both slides.
TISSUE_TILES = {
    **{(x, y): 1.0 for x in (256, 384, 512, 640) for y in (256, 384, 512, 640)},
    **{(x, y): 1.0 for x in (1024, 1152, 1280) for y in (896, 1024, 1152)},
    **{(1408, y): 0.5 for y in (896, 1024, 1152)},
}
# Tumour fraction of kept tiles on the tumour slide (all others 0).
TUMOR_TILES = {(256, 256): 0.75, (384, 256): 1.0, (256, 384): 1.0, (384, 384): 1.0,
               (512, 256): 0.5, (512, 384): 0.5, (1024, 1024): 0.5}
TUMOR_SLIDE = "patient_001_node_0"
NORMAL_SLIDE = "patient_002_node_1"


def _rect(box, colour, noise: float = 8.0) -> Shape:
    return Shape("rect", box, colour, noise=noise)


def slide_shapes(tumour: bool) -> list[Shape]:
    shapes = [_rect(TISSUE_A, PINK), _rect(TISSUE_B, PINK), _rect(SPECK, PINK),
              Shape("line", (96, 1400, 900, 1400), BLUE_PEN, width=24, noise=4),
              Shape("line", (1900, 300, 1900, 1200), GREEN_PEN, width=24, noise=4)]
    if tumour:
        shapes += [_rect(TUMOR_0, PURPLE), _rect(EXCLUSION_2, PINK), _rect(TUMOR_1, PURPLE)]
    return shapes


def _corners(box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def write_asap_xml(path: Path) -> Path:
    """CAMELYON16-style ASAP XML of the tumour slide's polygons."""
    annotations = []
    for index, (box, group) in enumerate(((TUMOR_0, "_0"), (TUMOR_1, "_1"), (EXCLUSION_2, "_2"))):
        coordinates = "".join(
            f'<Coordinate Order="{order}" X="{x}" Y="{y}" />' for order, (x, y) in enumerate(_corners(box))
        )
        annotations.append(
            f'<Annotation Name="Annotation {index}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
            f"<Coordinates>{coordinates}</Coordinates></Annotation>"
        )
    groups = "".join(f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>'
                     for g in ("_0", "_1", "_2"))
    path.write_text(f'<?xml version="1.0"?><ASAP_Annotations><Annotations>{"".join(annotations)}</Annotations>'
                    f"<AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>")
    return path


def write_geojson(path: Path, tumour_class: str = "Carcinoma", exclusion_class: str = "Exclusion") -> Path:
    """QuPath-style GeoJSON of the same polygons (classes need ``--label-map Carcinoma=tumor``)."""
    def feature(box, name):
        ring = [list(p) for p in _corners(box)] + [list(_corners(box)[0])]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name, "color": [255, 0, 0]}}}

    features = [feature(TUMOR_0, tumour_class), feature(TUMOR_1, tumour_class),
                feature(EXCLUSION_2, exclusion_class), feature((0, 0, 64, 64), "Stroma")]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_slide_set(root: Path) -> dict[str, Path]:
    """slides/ (tumour and normal slide), annotations/ (ASAP XML), geojson/, labels.csv under ``root``."""
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    (root / "geojson").mkdir(exist_ok=True)
    tumour = write_slide(root / "slides" / f"{TUMOR_SLIDE}.tif", slide_shapes(True), SIZE, MPP, levels=4)
    normal = write_slide(root / "slides" / f"{NORMAL_SLIDE}.tif", slide_shapes(False), SIZE, MPP, levels=4)
    write_asap_xml(root / "annotations" / f"{TUMOR_SLIDE}.xml")
    write_geojson(root / "geojson" / f"{TUMOR_SLIDE}.geojson")
    (root / "labels.csv").write_text(f"slide,label\n{TUMOR_SLIDE}.tif,Tumor\n{NORMAL_SLIDE}.tif,Normal\n")
    return {"root": root, "tumour": tumour, "normal": normal, "annotations": root / "annotations",
            "geojson": root / "geojson", "labels": root / "labels.csv"}


_SHARED: dict[str, dict[str, Path]] = {}


def shared_slide_set(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The slide set, written once per test session (each test module's ``slide_set`` fixture calls this)."""
    if "set" not in _SHARED:
        _SHARED["set"] = write_slide_set(tmp_path_factory.mktemp("wsi"))
    return _SHARED["set"]
