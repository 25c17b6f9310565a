"""A synthetic slide cohort: pyramidal TIFF slides, patients, slide labels, ASAP annotations, a manifest.

``histotoken synth --slides N OUT`` writes, deterministically from a seed::

    OUT/slides/<slide>.tif          pyramidal tiled TIFF (OpenSlide's generic-TIFF reader opens it)
    OUT/annotations/<slide>.xml     ASAP XML (CAMELYON16 layout, group _0) for every tumour slide
    OUT/slides.csv                  slide,label,patient_id (``data.wsi.labels.read_slide_labels``)
    OUT/cohort.json                 per slide: stage, tumour regions (longest diameter, area), tumour fraction
    OUT/histotoken_synthetic.json   the marker: synthetic, the generator version, the parameters

A slide is a lymph-node-like section drawn with :mod:`histotoken.data.wsi.synthetic`'s shapes: a pink
tissue outline (one large ellipse and a lobe), paler streaks, violet lymphoid follicles (benign
look-alikes, on every slide) and, on tumour slides, purple tumour deposits: close to the follicles in colour,
rougher in texture. Stages follow the CAMELYON17
size classes (longest diameter): ``macro`` (> 2 mm; with a micro deposit beside it), ``micro``
(0.2-2 mm, one to three deposits) and ``itc`` (isolated-tumour-cell-like foci under 0.2 mm, a small
cluster of them); normal slides (``negative``) carry none. Deposits lie inside the tissue and do not
overlap, so their areas add up; the annotation polygons are the drawn ellipses (96 vertices).

Pixel size: ``mpp`` microns per level-0 pixel (default 1.0, so the default 6144 x 4608 px slide is
6.1 x 4.6 mm: large enough for a > 2 mm deposit and small enough to tile and embed in seconds).
Patients: every third patient has two slides (labels drawn per slide, as lymph nodes of one patient
differ). The same seed and parameters give the same files; a re-run skips the slides already written.

Not pathology: the tissue is flat colour with a fixed texture; no number learned from it says anything
about real lymph nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histotoken.data.wsi.synthetic import Shape, write_slide
from histotoken.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

COHORT_VERSION = "1"  # bump when the drawing changes: re-runs refuse to mix versions in one folder
MARKER = "histotoken_synthetic.json"
MANIFEST = "cohort.json"
LABELS_CSV = "slides.csv"
SLIDES_DIR = "slides"
ANNOTATIONS_DIR = "annotations"
SLIDE_SUFFIX = ".tif"
SYNTHETIC_NOTE = (
    "These slides are synthetic: flat-colour lymph-node-like sections drawn by histotoken for demos, tests "
    "and pipeline checks. They are not pathology data; no result obtained on them says anything about real "
    "tissue or real models' clinical performance."
)
STAGES = ("macro", "micro", "itc")  # tumour stages, in the order tumour slides cycle through them
# Longest diameter of a deposit in micrometres, per size class (CAMELYON17: macro > 2 mm, micro 0.2-2 mm,
# isolated tumour cells < 0.2 mm).
DIAMETER_UM = {"macro": (2100.0, 2700.0), "micro": (250.0, 1500.0), "itc": (40.0, 150.0)}
TISSUE_COLOUR = (226, 160, 196)
STREAK_COLOUR = (236, 188, 212)
FOLLICLE_COLOUR = (166, 120, 198)
TUMOUR_COLOUR = (150, 88, 176)
POLYGON_VERTICES = 96
TUMOUR_NOISE = 24.0  # rougher than the follicles (10): colour alone barely tells them apart


@dataclasses.dataclass(frozen=True)
class CohortSettings:
    """What ``histotoken synth --slides`` draws (every field is in the marker: a re-run must match it)."""

    n_slides: int = 24
    size: tuple[int, int] = (6144, 4608)  # level-0 width, height in pixels
    mpp: float = 1.0
    tumour_share: float = 0.5  # share of slides that carry tumour
    seed: int = 0
    tile: int = 512  # TIFF tile side (pixels)

    def __post_init__(self) -> None:
        if self.n_slides < 2:
            raise ValueError(f"--slides must be at least 2 (one tumour, one normal), not {self.n_slides}")
        width, height = self.size
        if min(width, height) * self.mpp < 3200:
            raise ValueError(f"--slide-size {width}x{height} at {self.mpp} um/px is under 3.2 mm on its short side: "
                             "too small for a > 2 mm deposit; use at least 3200 px on each side at 1 um/px")
        if not 0 < self.tumour_share < 1:
            raise ValueError(f"tumour share must be between 0 and 1, not {self.tumour_share}")

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["size"] = list(self.size)
        return values


@dataclasses.dataclass(frozen=True)
class Region:
    """One tumour deposit: an axis-aligned ellipse in level-0 pixels (centre, semi-axes)."""

    stage: str
    cx: float
    cy: float
    rx: float
    ry: float

    def polygon(self, vertices: int = POLYGON_VERTICES) -> np.ndarray:
        """(vertices, 2) level-0 x, y of the ellipse outline (what the annotation file holds)."""
        return _ellipse_outline(self.cx, self.cy, self.rx, self.ry, vertices)

    def shape(self) -> Shape:
        """The drawn ellipse (``render`` fills the exact ellipse; the polygon is its 96-gon)."""
        return Shape("ellipse", (self.cx - self.rx, self.cy - self.ry, self.cx + self.rx, self.cy + self.ry),
                     TUMOUR_COLOUR, noise=TUMOUR_NOISE)


@dataclasses.dataclass(frozen=True)
class SlidePlan:
    """Everything drawn on one slide, decided before any pixel is written."""

    slide: str
    patient_id: str
    label: str  # tumor / normal
    stage: str  # macro / micro / itc / negative
    tissue: tuple[Shape, ...]
    regions: tuple[Region, ...]
    tissue_polygons: tuple[np.ndarray, ...]


@dataclasses.dataclass
class CohortSummary:
    out: Path
    n_slides: int
    n_patients: int
    created: int
    seconds: float


# --------------------------------------------------------------------------- drawing plan


def _ellipse_outline(cx: float, cy: float, rx: float, ry: float, vertices: int = POLYGON_VERTICES) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, vertices, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _place(rng: np.random.Generator, tissue, taken, stage: str, mpp: float, tries: int = 400) -> Region | None:
    """A deposit of ``stage``'s size inside ``tissue`` (shapely) and clear of ``taken`` (shapely), or None."""
    import shapely

    low, high = DIAMETER_UM[stage]
    minx, miny, maxx, maxy = tissue.bounds
    for _ in range(tries):
        diameter = rng.uniform(low, high) / mpp  # longest diameter, level-0 pixels
        aspect = rng.uniform(0.6, 0.95)
        wide = (maxx - minx >= maxy - miny) if stage == "macro" else rng.random() < 0.5  # macro: along the long side
        rx, ry = (diameter / 2, diameter / 2 * aspect) if wide else (diameter / 2 * aspect, diameter / 2)
        if maxx - minx <= 2 * rx or maxy - miny <= 2 * ry:
            continue  # this draw is wider than the room
        cx, cy = rng.uniform(minx + rx, maxx - rx), rng.uniform(miny + ry, maxy - ry)
        region = Region(stage, float(cx), float(cy), float(rx), float(ry))
        polygon = shapely.Polygon(region.polygon())
        margin = 30.0 / mpp  # deposits keep 30 um from each other and from the tissue edge
        if tissue.buffer(-margin).contains(polygon) and not taken.intersects(polygon.buffer(margin)):
            return region
    return None


def _stage_plan(stage: str, rng: np.random.Generator) -> list[str]:
    """The size classes of the deposits of a slide at ``stage``."""
    if stage == "macro":
        return ["macro", "micro"]
    if stage == "micro":
        return ["micro"] * int(rng.integers(1, 4))
    if stage == "itc":
        return ["itc"] * int(rng.integers(3, 7))
    return []


def plan_slide(index: int, slide: str, patient_id: str, stage: str, settings: CohortSettings) -> SlidePlan:
    """The shapes and deposits of slide ``index`` (its own random generator: (seed, index))."""
    import shapely

    rng = np.random.default_rng([settings.seed, index])
    width, height = settings.size
    # tissue: a large ellipse and a lobe overlapping it
    cx, cy = width * rng.uniform(0.46, 0.54), height * rng.uniform(0.46, 0.54)
    rx, ry = width * rng.uniform(0.38, 0.43), height * rng.uniform(0.37, 0.42)
    lobe_rx, lobe_ry = rx * rng.uniform(0.35, 0.5), ry * rng.uniform(0.35, 0.5)
    lobe_cx = cx + rng.choice([-1, 1]) * (rx - lobe_rx * 0.4)
    lobe_cy = min(max(cy + rng.uniform(-0.5, 0.5) * ry, lobe_ry + 8), height - lobe_ry - 8)
    lobe_cx = min(max(lobe_cx, lobe_rx + 8), width - lobe_rx - 8)
    ellipses = [(cx, cy, rx, ry), (lobe_cx, lobe_cy, lobe_rx, lobe_ry)]
    tissue_polygons = tuple(_ellipse_outline(*e) for e in ellipses)
    shapes = [Shape("ellipse", (x - a, y - b, x + a, y + b), TISSUE_COLOUR, noise=10.0) for x, y, a, b in ellipses]
    main = shapely.Polygon(tissue_polygons[0])
    for _ in range(int(rng.integers(2, 5))):  # paler streaks of connective tissue across the main ellipse
        x0, y0 = rng.uniform(cx - rx * 0.7, cx + rx * 0.7), rng.uniform(cy - ry * 0.7, cy + ry * 0.7)
        angle, length = rng.uniform(0, math.pi), rng.uniform(0.2, 0.5) * rx
        x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
        if not main.contains(shapely.LineString([(x0, y0), (x1, y1)]).buffer(60 / settings.mpp)):
            continue  # streaks stay inside the tissue
        shapes.append(Shape("line", (x0, y0, x1, y1), STREAK_COLOUR, width=rng.uniform(20, 50) / settings.mpp))
    regions: list[Region] = []
    taken = shapely.Polygon()
    for kind in _stage_plan(stage, rng):
        if kind == "itc" and regions:  # isolated cells cluster within ~0.6 mm of the first focus
            first = regions[0]
            near = shapely.Point(first.cx, first.cy).buffer(600.0 / settings.mpp).intersection(main)
            region = _place(rng, near, taken, kind, settings.mpp)
        else:
            region = _place(rng, main, taken, kind, settings.mpp)
        if region is None:
            if not regions or kind == "macro":
                raise ValueError(f"{slide}: no room for a {kind} deposit in the tissue; use a larger --slide-size")
            continue  # a further micro deposit or focus that does not fit is left out
        regions.append(region)
        taken = taken.union(shapely.Polygon(region.polygon()))
    # lymphoid follicles: benign, darker than tissue, on every slide (drawn after the deposits, clear of them)
    for _ in range(int(rng.integers(3, 7))):
        radius = rng.uniform(120, 260) / settings.mpp
        fx, fy = rng.uniform(cx - rx * 0.8, cx + rx * 0.8), rng.uniform(cy - ry * 0.8, cy + ry * 0.8)
        follicle = shapely.Point(fx, fy).buffer(radius)
        if main.contains(follicle) and not taken.intersects(follicle.buffer(30 / settings.mpp)):
            taken = taken.union(follicle)
            shapes.append(Shape("ellipse", (fx - radius, fy - radius * 0.85, fx + radius, fy + radius * 0.85),
                                FOLLICLE_COLOUR, noise=10.0))
    shapes.extend(region.shape() for region in regions)
    label = "tumor" if stage in STAGES else "normal"
    return SlidePlan(slide, patient_id, label, stage, tuple(shapes), tuple(regions), tissue_polygons)


def cohort_layout(settings: CohortSettings) -> list[tuple[str, str, str]]:
    """(slide, patient_id, stage) of every slide: every third patient has two slides; tumour slides cycle
    macro, micro, itc; the slide order is shuffled by the seed so that labels do not follow patients."""
    rng = np.random.default_rng([settings.seed, 10**6])
    n_tumour = max(1, min(settings.n_slides - 1, int(round(settings.n_slides * settings.tumour_share))))
    stages = [STAGES[i % len(STAGES)] for i in range(n_tumour)] + ["negative"] * (settings.n_slides - n_tumour)
    stages = [stages[i] for i in rng.permutation(len(stages))]
    layout, patient, index = [], 0, 0
    while index < settings.n_slides:
        count = 2 if patient % 3 == 2 and index + 1 < settings.n_slides else 1
        for node in range(count):
            patient_id = f"synth_patient_{patient:03d}"
            layout.append((f"{patient_id}_node_{node}", patient_id, stages[index]))
            index += 1
        patient += 1
    return layout


# --------------------------------------------------------------------------- files


def asap_xml(regions: Sequence[Region]) -> str:
    """ASAP XML (CAMELYON16 layout) with one polygon per deposit in group ``_0`` (tumour)."""
    root = ElementTree.Element("ASAP_Annotations")
    annotations = ElementTree.SubElement(root, "Annotations")
    for number, region in enumerate(regions):
        annotation = ElementTree.SubElement(annotations, "Annotation", Name=f"{region.stage} {number}",
                                            Type="Polygon", PartOfGroup="_0", Color="#F4FA58")
        coordinates = ElementTree.SubElement(annotation, "Coordinates")
        for order, (x, y) in enumerate(region.polygon()):
            ElementTree.SubElement(coordinates, "Coordinate", Order=str(order), X=f"{x:.2f}", Y=f"{y:.2f}")
    groups = ElementTree.SubElement(root, "AnnotationGroups")
    group = ElementTree.SubElement(groups, "Group", Name="_0", PartOfGroup="None", Color="#FF0000")
    ElementTree.SubElement(group, "Attributes")
    ElementTree.indent(root)
    return '<?xml version="1.0"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"


def slide_record(plan: SlidePlan, settings: CohortSettings) -> dict[str, Any]:
    """The manifest entry of a slide: stage, deposits (longest diameter in um, area in mm2), areas, fraction."""
    import shapely

    mm2 = (settings.mpp / 1000.0) ** 2  # mm2 per level-0 pixel
    tissue = shapely.union_all([shapely.Polygon(p) for p in plan.tissue_polygons])
    regions = []
    for region in plan.regions:
        polygon = shapely.Polygon(region.polygon())
        regions.append({
            "stage": region.stage, "x": round(region.cx, 1), "y": round(region.cy, 1),
            "longest_diameter_um": round(2 * max(region.rx, region.ry) * settings.mpp, 1),
            "area_mm2": round(polygon.area * mm2, 6),
        })
    tumour_mm2 = sum(r["area_mm2"] for r in regions)
    return {
        "slide": plan.slide, "patient_id": plan.patient_id, "label": plan.label, "stage": plan.stage,
        "file": f"{SLIDES_DIR}/{plan.slide}{SLIDE_SUFFIX}",
        "annotations": f"{ANNOTATIONS_DIR}/{plan.slide}.xml" if plan.regions else None,
        "regions": regions, "tumour_area_mm2": round(tumour_mm2, 6),
        "tissue_area_mm2": round(tissue.area * mm2, 6),
        "tumour_area_fraction": round(tumour_mm2 / (tissue.area * mm2), 6),
    }


def _write_one(plan: SlidePlan, settings: CohortSettings, out: Path) -> str:
    """The slide's annotation file, then its TIFF (renamed into place last: a TIFF on disk means done)."""
    if plan.regions:
        atomic_write_text(out / ANNOTATIONS_DIR / f"{plan.slide}.xml", asap_xml(plan.regions))
    final = out / SLIDES_DIR / f"{plan.slide}{SLIDE_SUFFIX}"
    partial = final.with_name(final.name + ".partial")
    write_slide(partial, plan.tissue, settings.size, mpp=settings.mpp, tile=settings.tile)
    os.replace(partial, final)
    return plan.slide


def _marker(settings: CohortSettings) -> dict[str, Any]:
    return {"synthetic": True, "note": SYNTHETIC_NOTE, "generator": "histotoken.data.wsi.cohort",
            "generator_version": COHORT_VERSION, "parameters": settings.to_dict()}


def _prepare(out: Path, marker: dict[str, Any]) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a new or empty folder for the slide cohort")
    if not out.exists() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return
    if not (out / MARKER).is_file():
        raise ValueError(f"{out} is not empty and holds no {MARKER}; give a new or empty folder for the slide cohort")
    found = read_json(out / MARKER)
    if found.get("generator") != marker["generator"]:
        raise ValueError(f"{out} holds a synthetic BreakHis set, not a slide cohort; give another folder")
    before = {"generator_version": found.get("generator_version"), **(found.get("parameters") or {})}
    now = {"generator_version": marker["generator_version"], **marker["parameters"]}
    if before != now:
        changed = ", ".join(f"{k} {before.get(k)} there, {now[k]} asked" for k in now if before.get(k) != now[k])
        raise ValueError(f"{out} holds a slide cohort made with other parameters ({changed}); give another folder")


def generate_cohort(out: str | Path, settings: CohortSettings = CohortSettings(), workers: int = 1,
                    progress: Callable[[int, int], None] | None = None) -> CohortSummary:
    """Write the cohort into ``out`` (see the module docstring); slides already there are skipped."""
    from histotoken.data.wsi.tiling import worker_pool

    out = Path(out)
    start = time.perf_counter()
    marker = _marker(settings)
    _prepare(out, marker)
    (out / SLIDES_DIR).mkdir(exist_ok=True)
    (out / ANNOTATIONS_DIR).mkdir(exist_ok=True)
    atomic_write_json(out / MARKER, {**marker, "complete": False})
    plans = [plan_slide(i, slide, patient, stage, settings)
             for i, (slide, patient, stage) in enumerate(cohort_layout(settings))]
    records = [slide_record(plan, settings) for plan in plans]
    atomic_write_json(out / MANIFEST, {**marker, "slides": records})
    labels = pd.DataFrame({"slide": [p.slide for p in plans], "label": [p.label for p in plans],
                           "patient_id": [p.patient_id for p in plans]})
    atomic_write_bytes(out / LABELS_CSV, labels.to_csv(index=False).encode())
    pending = [p for p in plans if not (out / SLIDES_DIR / f"{p.slide}{SLIDE_SUFFIX}").is_file()]
    done = len(plans) - len(pending)
    if workers > 1 and len(pending) > 1:
        with worker_pool(min(workers, len(pending))) as pool:
            for future in as_completed([pool.submit(_write_one, plan, settings, out) for plan in pending]):
                future.result()
                done += 1
                if progress:
                    progress(done, len(plans))
    else:
        for plan in pending:
            _write_one(plan, settings, out)
            done += 1
            if progress:
                progress(done, len(plans))
    atomic_write_json(out / MARKER, {**marker, "complete": True})
    return CohortSummary(out, len(plans), len({p.patient_id for p in plans}), len(pending),
                         time.perf_counter() - start)


def slide_paths(out: str | Path) -> list[Path]:
    """The cohort's slide files, in the manifest's order."""
    manifest = read_json(Path(out) / MANIFEST)
    return [Path(out) / record["file"] for record in manifest["slides"]]
