"""Tile grid at a target resolution, per-slide coordinate tables and the ``histotoken tile`` work.

For each slide: a tissue mask at low resolution (:mod:`tissue`), a square grid at the target mpp in
level-0 coordinates, the pyramid level to read each tile from (the coarsest level not coarser than the
target, so a read is a small downscale at most), each tile's tissue fraction from the mask, tumour
fraction from the annotations (:mod:`annotations`) and label. Tiles are coordinates (as in CLAM): pixels
are read later, lazily (:mod:`dataset`).

Slides run in parallel processes, one slide per task. Per slide, the thumbnail and the summary record
are written first and the coordinate table last, atomically: a table on disk means the slide is done,
and a re-run skips it. summary.csv is rebuilt from the per-slide records after every run (never
appended to by several processes).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histotoken import formats
from histotoken.data.wsi.annotations import Annotations, find_annotation_file, read_annotations
from histotoken.data.wsi.labels import patient_from_name, read_slide_labels
from histotoken.data.wsi.reader import Resolution, Slide, open_slide, slide_name
from histotoken.data.wsi.thumbnails import png_bytes, tiling_thumbnail
from histotoken.data.wsi.tissue import TissueMask, TissueSettings, detect_tissue
from histotoken.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

logger = logging.getLogger(__name__)

FEW_TILES = 5  # a slide keeping fewer tiles than this is flagged
LOW_TISSUE_FRACTION = 0.01  # a slide with less tissue than this share of its area is flagged
CHECKED_TILES = 4  # kept tiles read back per slide, so that unreadable tile data fails the slide here


@dataclasses.dataclass(frozen=True)
class TilingSettings:
    """How slides are cut into tiles (``histotoken tile`` options)."""

    tile_size: int = 224  # pixels of a tile at the target resolution
    resolution: Resolution = Resolution(0.5, "mpp")
    overlap: int = 0  # pixels shared by neighbouring tiles, at the target resolution
    tissue_threshold: float = 0.5  # keep a tile whose tissue fraction reaches this
    min_tumor_fraction: float = 0.5  # a tile is tumour when this share of it lies in tumour polygons
    tissue: TissueSettings = TissueSettings()

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"--tile-size must be positive, not {self.tile_size}")
        if not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"--overlap must be in [0, tile size {self.tile_size}), not {self.overlap}")
        if not 0 <= self.tissue_threshold <= 1 or not 0 < self.min_tumor_fraction <= 1:
            raise ValueError("--tissue-threshold must be in [0, 1] and --min-tumor-fraction in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TilingSettings:
        """The inverse of ``to_dict`` (e.g. a tile folder's tiling.json)."""
        values = dict(data)
        values["resolution"] = Resolution(**values["resolution"])
        values["tissue"] = TissueSettings(**values.get("tissue", {}))
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Top-left corners (level 0) of every grid tile, and how to read one."""

    xs: np.ndarray  # (N,) int64
    ys: np.ndarray  # (N,) int64
    size: float  # level-0 pixels a tile spans
    level: int  # pyramid level to read from
    read_size: int  # pixels to read at that level (then resized to tile_size)
    mpp: float  # microns per pixel of the tiles


def tile_grid(slide: Slide, settings: TilingSettings) -> TileGrid:
    """The full grid of tiles of ``settings.tile_size`` pixels at the target resolution that fit in the slide."""
    mpp = slide.mpp_of(settings.resolution)
    downsample = mpp / slide.mpp  # level-0 pixels per target pixel
    size = settings.tile_size * downsample
    stride = (settings.tile_size - settings.overlap) * downsample
    width, height = slide.dimensions
    level = slide.best_level(downsample)
    read_size = max(int(round(size / slide.level_downsamples[level])), 1)
    columns = max(int(math.floor((width - size) / stride + 1e-9)) + 1, 0) if width >= size else 0
    rows = max(int(math.floor((height - size) / stride + 1e-9)) + 1, 0) if height >= size else 0
    xs = np.round(np.arange(columns) * stride).astype(np.int64)
    ys = np.round(np.arange(rows) * stride).astype(np.int64)
    grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: tiles ordered by row, then column
    return TileGrid(grid_x.ravel(), grid_y.ravel(), size, level, read_size, mpp)


def tile_labels(
    tumor_fraction: np.ndarray, has_annotations: bool, slide_label: str, min_tumor_fraction: float
) -> np.ndarray:
    """Per-tile ``tumor`` / ``normal`` / ``""`` (unknown: a tumour or unlabelled slide without annotations)."""
    if has_annotations:
        return np.where(tumor_fraction >= min_tumor_fraction, "tumor", "normal")
    return np.full(len(tumor_fraction), "normal" if slide_label == "normal" else "", dtype=object)


def tile_table(
    slide: Slide,
    settings: TilingSettings,
    tissue: TissueMask,
    annotations: Annotations | None = None,
    slide_label: str = "",
    patient_id: str | None = None,
) -> pd.DataFrame:
    """The kept tiles of ``slide`` (tissue fraction >= threshold) with the columns of ``formats.TILE_COLUMNS``."""
    grid = tile_grid(slide, settings)
    tissue_fraction = tissue.fractions(grid.xs, grid.ys, grid.size)
    keep = tissue_fraction >= settings.tissue_threshold - 1e-9
    xs, ys, tissue_fraction = grid.xs[keep], grid.ys[keep], tissue_fraction[keep]
    if annotations is not None:
        tumor_fraction = annotations.tumor_fractions(xs, ys, grid.size)
    else:
        tumor_fraction = np.full(len(xs), 0.0 if slide_label == "normal" else np.nan)
    labels = tile_labels(tumor_fraction, annotations is not None, slide_label, settings.min_tumor_fraction)
    count = len(xs)
    frame = pd.DataFrame(
        {
            "slide": [slide.name] * count,
            "slide_path": [str(slide.path)] * count,
            "x": xs.astype(np.int64),
            "y": ys.astype(np.int64),
            "level": np.full(count, grid.level, dtype=np.int64),
            "read_size": np.full(count, grid.read_size, dtype=np.int64),
            "tile_size": np.full(count, settings.tile_size, dtype=np.int64),
            "mpp": np.full(count, grid.mpp, dtype=np.float64),
            "tissue_fraction": tissue_fraction.astype(np.float64),
            "tumor_fraction": tumor_fraction.astype(np.float64),
            "label": pd.Series(labels, dtype=object).astype(str),
            "slide_label": [slide_label] * count,
            "patient_id": [patient_id or patient_from_name(slide.name)] * count,
        }
    )
    return frame[list(formats.TILE_COLUMNS)]


@dataclasses.dataclass(frozen=True)
class SlideJob:
    """One slide to tile, with what is known about it."""

    path: Path
    annotation_path: Path | None = None
    label_map: Mapping[str, str] | None = None
    slide_label: str = ""
    patient_id: str | None = None
    slide_mpp: float | None = None  # pixel size to use when the file records none

    @property
    def name(self) -> str:
        return slide_name(self.path)


def check_tile_reads(slide: Slide, table: pd.DataFrame, count: int = CHECKED_TILES) -> None:
    """Read ``count`` kept tiles spread over the table (first, last and between) at the level training will read.

    The mask comes from a coarse level, so broken tile data at the tiles' level would otherwise surface only
    in ``train`` or ``predict``; here it fails the slide with a line naming it and OpenSlide's error.
    """
    if not len(table):
        return
    for index in np.unique(np.linspace(0, len(table) - 1, num=min(count, len(table))).round().astype(int)):
        row = table.iloc[int(index)]
        try:
            slide.read_tile(int(row["x"]), int(row["y"]), int(row["level"]), int(row["read_size"]), int(row["tile_size"]))
        except Exception as error:  # noqa: BLE001  (OpenSlideError is a plain Exception)
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ValueError(f"{slide.path}: tile data at level {int(row['level'])} cannot be read "
                             f"({type(error).__name__}: {detail}); the file is damaged") from None


def coverage_warning(name: str, n_tiles: int, tissue_fraction: float) -> str | None:
    """A sentence when a slide keeps almost nothing (fewer than ``FEW_TILES`` tiles or under 1% tissue)."""
    if n_tiles < FEW_TILES or tissue_fraction < LOW_TISSUE_FRACTION:
        return (f"{name}: only {n_tiles} tiles kept and {100 * tissue_fraction:.1f}% of the slide found to be tissue; "
                "check its thumbnail (a blank slide, faint stain or wrong --slide-mpp?)")
    return None


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def tile_one_slide(job: SlideJob, settings: TilingSettings, out_dir: Path) -> dict[str, Any]:
    """Tile one slide into ``out_dir`` (thumbnail, record, then the table); returns its summary record.

    Any error becomes a ``failed`` record with a one-line message, so that other slides go on.
    """
    paths = formats.TilePaths(Path(out_dir))
    start = time.perf_counter()
    record: dict[str, Any] = {column: None for column in formats.TILE_SUMMARY_COLUMNS}
    record.update(slide=job.name, slide_path=str(job.path), slide_label=job.slide_label,
                  patient_id=job.patient_id or patient_from_name(job.name),
                  annotations=str(job.annotation_path) if job.annotation_path else "")
    try:
        with open_slide(job.path, job.slide_mpp) as slide:
            annotations = read_annotations(job.annotation_path, job.label_map) if job.annotation_path else None
            if annotations is not None and job.slide_label == "tumor" and annotations.region.is_empty:
                logger.warning("%s: the slide is labelled tumour but its annotation file %s holds no tumour polygon; "
                               "all its tiles will be labelled normal", job.path, job.annotation_path)
            tissue = detect_tissue(slide, settings.tissue)
            table = tile_table(slide, settings, tissue, annotations, job.slide_label, job.patient_id)
            check_tile_reads(slide, table)
            size = settings.tile_size * slide.downsample_for(settings.resolution)
            picture = tiling_thumbnail(tissue.image, tissue.mask, tissue.scale, table["x"], table["y"], size,
                                       table["label"])
            atomic_write_bytes(paths.thumbnail(job.name), png_bytes(picture))
            mask_mpp = slide.mpp * (tissue.scale[0] + tissue.scale[1]) / 2
            record.update(
                status="done", error="", n_tiles=len(table), n_tumor_tiles=int((table["label"] == "tumor").sum()),
                tissue_mm2=round(float(tissue.mask.sum()) * (mask_mpp / 1000) ** 2, 4),
                tissue_fraction=round(tissue.tissue_fraction, 4), slide_mpp=slide.mpp,
                mpp=slide.mpp_of(settings.resolution), level=int(tile_grid(slide, settings).level),
                width=slide.dimensions[0], height=slide.dimensions[1],
                seconds=round(time.perf_counter() - start, 3),
            )
            atomic_write_json(paths.record(job.name), record)
            atomic_write_bytes(paths.table(job.name), parquet_bytes(table))  # last: marks the slide done
        warning = coverage_warning(job.name, len(table), tissue.tissue_fraction)
        if warning:
            logger.warning("%s", warning)
    except Exception as error:  # noqa: BLE001  (one bad slide must not stop the others)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if str(job.path) not in message:
            message = f"{job.path}: {message}"
        record.update(status="failed", error=message, seconds=round(time.perf_counter() - start, 3))
        atomic_write_json(paths.record(job.name), record)
        logger.warning("%s", message)
        logger.debug("%s: traceback", job.path, exc_info=True)
    return record


def rebuild_summary(out_dir: Path) -> pd.DataFrame:
    """summary.csv from every slides/<slide>.json in the tile folder (one row per slide, by name)."""
    paths = formats.TilePaths(Path(out_dir))
    records = [read_json(p) for p in sorted((paths.root / formats.TILE_SLIDE_RECORDS_DIR).glob("*.json"))]
    frame = pd.DataFrame(records, columns=list(formats.TILE_SUMMARY_COLUMNS))
    atomic_write_text(paths.summary, frame.to_csv(index=False))
    return frame


def check_settings(out_dir: Path, settings: TilingSettings) -> None:
    """Write tiling.json, or refuse a tile folder made with other settings (its tables would not match)."""
    paths = formats.TilePaths(Path(out_dir))
    wanted = settings.to_dict()
    if paths.settings.exists():
        found = read_json(paths.settings)
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise ValueError(f"{paths.root}: tiled before with other settings ({', '.join(changed)}); "
                             "use a new --out folder or the same options")
        return
    atomic_write_json(paths.settings, wanted)


def slide_jobs(
    slides: Sequence[str | Path],
    annotations_dir: str | Path | None = None,
    labels_csv: str | Path | None = None,
    label_map: Mapping[str, str] | None = None,
    slide_mpp: float | None = None,
) -> list[SlideJob]:
    """One job per slide path, with its annotation file, slide label and patient id."""
    if annotations_dir is not None and not Path(annotations_dir).is_dir():
        raise FileNotFoundError(f"{annotations_dir}: no such annotations folder")
    labels = read_slide_labels(labels_csv) if labels_csv else None
    jobs, seen = [], {}
    for path in map(Path, slides):
        name = slide_name(path)
        if name in seen:
            raise ValueError(f"{path}: two slides are named {name!r} ({seen[name]}); tile folders key slides by name")
        seen[name] = path
        label, patient = "", None
        if labels is not None and name in labels.index:
            label, patient = labels.at[name, "label"], labels.at[name, "patient_id"]
        jobs.append(SlideJob(path, find_annotation_file(annotations_dir, name), dict(label_map or {}), label,
                             patient, slide_mpp))
    return jobs


def tile_slides(
    jobs: Sequence[SlideJob], out_dir: str | Path, settings: TilingSettings = TilingSettings(), workers: int = 1
) -> pd.DataFrame:
    """Tile every slide not already done, ``workers`` slides at a time; returns the rebuilt summary."""
    out_dir = Path(out_dir)
    paths = formats.TilePaths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_settings(out_dir, settings)
    pending = [job for job in jobs if not paths.table(job.name).exists()]
    if len(pending) < len(jobs):
        logger.info("%d of %d slides already tiled in %s; skipped", len(jobs) - len(pending), len(jobs), out_dir)
    if workers > 1 and len(pending) > 1:
        with worker_pool(min(workers, len(pending))) as pool:
            futures = {pool.submit(tile_one_slide, job, settings, out_dir): job for job in pending}
            for done, future in enumerate(as_completed(futures), 1):
                record = future.result()
                logger.info("[%d/%d] %s: %s", done, len(pending), record["slide"], _describe(record))
    else:
        for done, job in enumerate(pending, 1):
            record = tile_one_slide(job, settings, out_dir)
            logger.info("[%d/%d] %s: %s", done, len(pending), record["slide"], _describe(record))
    return rebuild_summary(out_dir)


def _die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker gets SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``),
    so a killed ``tile`` leaves no worker writing tables behind it. A worker whose parent is already gone
    when it starts exits at once."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """The process pool that tiles slides: its workers exit when the parent process dies."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),))


def _describe(record: Mapping[str, Any]) -> str:
    if record["status"] != "done":
        return f"failed ({record['error']})"
    return f"{record['n_tiles']} tiles ({record['n_tumor_tiles']} tumour) in {record['seconds']:.1f} s"


def read_tile_tables(tiles_dir: str | Path) -> pd.DataFrame:
    """Every tiles/<slide>.parquet of a tile folder, concatenated (slides in name order)."""
    paths = formats.TilePaths(Path(tiles_dir))
    tables = paths.tables()
    if not tables:
        raise FileNotFoundError(f"{tiles_dir}: no tile tables (tiles/*.parquet); run `histotoken tile` first")
    return pd.concat([pd.read_parquet(p) for p in tables], ignore_index=True)
