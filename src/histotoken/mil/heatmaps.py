"""Tile-importance heatmaps of a slide classifier: RUN/heatmaps/<slide>.png on the slide's thumbnail.

Each aggregator gives every tile an importance (attention weight, tile margin, keep probability, slot
weight: see docs/mil.md), on scales that differ between aggregators and slides. The heatmap shows the
tile's **percentile rank within its slide** (0 = least, 1 = most important; ties share their mean rank,
as CLAM draws its attention maps), so maps of different aggregators read the same way. Tiles an
aggregator did not read (importance NaN) are left uncoloured.

The thumbnail is the slide read at the tissue mask's resolution (``data.wsi.tissue.read_at_mpp``, about
8 um/px), overlaid with ``data.wsi.thumbnails.heatmap`` and given the colour bar that the slide report
uses (``reporting.slides.heatmap_with_colour_bar``): rows 0..h and columns 0..w of the PNG are the
thumbnail pixel for pixel. Annotated tumour regions are outlined in black when the tile folder recorded
an annotation file. The slide is found through the feature file: its ``tile_table`` attribute names
the tile table, whose ``slide_path`` column names the slide (``histotoken embed`` writes both). A slide
that is gone (moved, deleted), or a feature file that does not say where its slide is (another tool wrote
it), is skipped with one warning naming how many maps were left out.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from histotoken import formats
from histotoken.io import atomic_write_bytes

logger = logging.getLogger(__name__)

IMPORTANCE_LABEL = "tile importance (percentile within the slide)"
THUMBNAIL_MPP = 8.0  # microns per thumbnail pixel: the tissue mask's default resolution


def percentile_ranks(importance: np.ndarray) -> np.ndarray:
    """Rank of each finite value among the finite values, scaled to [0, 1] (ties: mean rank); NaN stays NaN."""
    from scipy.stats import rankdata

    importance = np.asarray(importance, dtype=np.float64)
    ranks = np.full(importance.shape, np.nan)
    finite = np.isfinite(importance)
    count = int(finite.sum())
    if count == 1:
        ranks[finite] = 1.0
    elif count > 1:
        ranks[finite] = (rankdata(importance[finite], method="average") - 1) / (count - 1)
    return ranks


def slide_source(feature_file: str | Path) -> dict[str, object] | None:
    """Where a feature file's slide is: ``slide_path``, ``tile_size`` (level-0 px), ``annotations`` (or None);
    None when the file does not say (written by another tool)."""
    from histotoken.features.store import read_attrs

    attrs = read_attrs(Path(feature_file))
    table_path = attrs.get("tile_table")
    if not table_path or not Path(str(table_path)).is_file():
        return None
    table = pd.read_parquet(str(table_path), columns=["slide_path"])
    if table.empty:
        return None
    tiles_root = Path(str(table_path)).parent.parent
    record_path = formats.TilePaths(tiles_root).record(str(attrs.get("slide", Path(feature_file).stem)))
    annotations = None
    if record_path.is_file():
        annotations = json.loads(record_path.read_text()).get("annotations") or None
    return {"slide_path": str(table["slide_path"].iloc[0]), "tile_size": float(attrs.get("tile_size_level0") or 0),
            "annotations": annotations}


_THUMBNAILS: collections.OrderedDict[str, tuple[np.ndarray, tuple[float, float]]] = collections.OrderedDict()
THUMBNAIL_CACHE_BYTES = 256 * 2**20  # thumbnails kept between calls (a demo's ~40 slides; a few CAMELYON ones)


def thumbnail(slide_path: str) -> tuple[np.ndarray, tuple[float, float]]:
    """(RGB thumbnail at ``THUMBNAIL_MPP``, level-0 pixels per thumbnail pixel) of a slide. Recent thumbnails are
    kept (up to ``THUMBNAIL_CACHE_BYTES``), so that several runs drawing the same test slides in one process
    (``histotoken slides demo``) read each slide once."""
    from histotoken.data.wsi.reader import open_slide
    from histotoken.data.wsi.tissue import read_at_mpp

    key = f"{Path(slide_path).resolve()}:{Path(slide_path).stat().st_mtime_ns}"  # a rewritten slide is read again
    if key in _THUMBNAILS:
        _THUMBNAILS.move_to_end(key)
        return _THUMBNAILS[key]
    with open_slide(slide_path) as slide:
        image, _, scale = read_at_mpp(slide, THUMBNAIL_MPP)
    image.flags.writeable = False  # shared between calls
    _THUMBNAILS[key] = (image, scale)
    while sum(entry[0].nbytes for entry in _THUMBNAILS.values()) > THUMBNAIL_CACHE_BYTES and len(_THUMBNAILS) > 1:
        _THUMBNAILS.popitem(last=False)
    return image, scale


def heatmap_png(slide_path: str | Path, importance: pd.DataFrame, tile_size: float,
                annotations_path: str | Path | None = None) -> bytes:
    """The PNG of one slide's heatmap: ``importance`` has columns x, y (level-0 top-left) and importance."""
    from histotoken.data.wsi.annotations import read_annotations
    from histotoken.data.wsi.thumbnails import heatmap
    from histotoken.reporting.slides import heatmap_with_colour_bar

    image, scale = thumbnail(str(slide_path))
    values = percentile_ranks(importance["importance"].to_numpy())
    read = np.isfinite(values)
    annotations = read_annotations(annotations_path) if annotations_path and Path(annotations_path).is_file() else None
    picture = heatmap(image, scale, importance["x"].to_numpy()[read], importance["y"].to_numpy()[read], tile_size,
                      values[read], annotations)
    return heatmap_with_colour_bar(picture, IMPORTANCE_LABEL)


def write_heatmaps(run_dir: str | Path, feature_files: Mapping[str, Path],
                   importance: Mapping[str, pd.DataFrame]) -> list[Path]:
    """RUN/heatmaps/<slide>.png for every slide in ``importance`` whose slide file can be found; returns them."""
    out = Path(run_dir) / formats.SLIDE_HEATMAPS_DIR
    written, gone, unnamed = [], [], []
    for slide, frame in importance.items():
        source = slide_source(feature_files[slide])
        if source is None or not source["tile_size"]:
            unnamed.append(slide)
        elif not Path(str(source["slide_path"])).is_file():
            gone.append(str(source["slide_path"]))
        else:
            png = heatmap_png(str(source["slide_path"]), frame, float(source["tile_size"]), source["annotations"])
            written.append(atomic_write_bytes(out / f"{slide}.png", png))
    if gone:
        logger.warning("%d heatmap(s) left out: the slide file is gone (e.g. %s); the tile importance is in "
                       "%s/importance/<slide>.csv", len(gone), gone[0], run_dir)
    if unnamed:
        logger.warning("%d heatmap(s) left out: the feature file does not lead to its slide (e.g. %s: no tile table "
                       "recorded, as `histotoken embed` does, or the tile folder moved); the tile importance is in %s/importance/<slide>.csv",
                       len(unnamed), unnamed[0], run_dir)
    return written
