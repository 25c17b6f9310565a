"""Report section "Dataset preview": example images per tumour class (and magnification, where there are)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from histotoken.reporting import plots, tables
from histotoken.reporting.blocks import Note
from histotoken.reporting.sections.context import ReportSection, SectionContext
from histotoken.reporting.words import index_key_suffix

logger = logging.getLogger(__name__)

PREVIEW_PER_CELL = 2
PREVIEW_THUMBNAIL_PX = (96, 64)  # BreakHis images are 700 x 460

def build(context: SectionContext) -> list:
    study = context.study
    if not study.split_files:
        return [Note("No split file in splits/: there is no list of images to preview.")]
    name, split = next(iter(study.split_files.items()))
    by_magnification = study.words.has_magnification
    needed = {"path", "tumor_class", "magnification"} if by_magnification else {"path", "tumor_class"}
    if not needed <= set(split.columns):
        return [Note(f"splits/{name} lacks the column(s) {', '.join(sorted(needed - set(split.columns)))}.")]
    # data without magnifications (magnification 0 in the index) are one column group of examples
    magnification = split["magnification"].map(tables.magnification_label) if by_magnification else "all"
    split = split.assign(magnification=magnification)
    classes = tables.class_order(split["tumor_class"])
    magnifications = tables.sort_domains(split["magnification"])
    data_root = Path(str((study.dataset or {}).get("data_root", "")) or study.root)
    thumbnails: dict[tuple[str, str], list[np.ndarray | None]] = {}
    tried, found, first_missing = 0, 0, None
    for (tumor_class, magnification), group in split.groupby(["tumor_class", "magnification"], sort=False):
        if "patient_id" in group.columns:  # prefer examples from different patients
            group = pd.concat([group.drop_duplicates("patient_id"), group]).drop_duplicates("path")
        images = []
        for path_text in group["path"].head(PREVIEW_PER_CELL):
            tried += 1
            path = _resolve_image_path(path_text, data_root, study.root)
            image = _thumbnail(path) if path is not None else None
            if image is None:
                first_missing = first_missing or path_text
            else:
                found += 1
            images.append(image)
        thumbnails[(tumor_class, magnification)] = images
    if found == 0 and index_key_suffix(str(first_missing)) is not None:
        return [Note(f"The images listed in splits/{name} are records inside data files (e.g. {first_missing}), "
                     "not image files: the preview shows image files only.")]
    if found == 0:
        return [Note(
            f"The images listed in splits/{name} were not found (first one looked for: {first_missing}; "
            f"data root: {data_root}), so no preview is shown. Make the data available at that path and "
            "re-run `histotoken report`."
        )]
    blocks: list = [context.figure(
        "dataset_preview",
        plots.image_grid_figure(thumbnails, classes, magnifications, PREVIEW_PER_CELL, PREVIEW_THUMBNAIL_PX,
                                column_labels=None if by_magnification else ["examples"]),
        f"Example images per tumour class and magnification (from splits/{name})." if by_magnification else
        f"Example images per tumour class (from splits/{name}).",
        (f"Rows are tumour classes and columns magnifications, {PREVIEW_PER_CELL} images each" if by_magnification
         else f"Rows are tumour classes, {PREVIEW_PER_CELL} images each") + " from different patients where "
        "possible; check that each row looks like what its label names.",
        photographic=True,
    )]
    if found < tried:
        blocks.append(Note(f"{tried - found} of {tried} preview images could not be read "
                           f"(first: {first_missing}); their cells are grey."))
    return blocks



def _resolve_image_path(path_text: str, data_root: Path, study_root: Path) -> Path | None:
    path = Path(str(path_text))
    for candidate in (path,) if path.is_absolute() else (data_root / path, study_root / path, path):
        if candidate.is_file():
            return candidate
    return None


def _thumbnail(path: Path) -> np.ndarray | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", PREVIEW_THUMBNAIL_PX)  # JPEG: decode at reduced size
            image = image.convert("RGB")
            scale = min(PREVIEW_THUMBNAIL_PX[0] / image.width, PREVIEW_THUMBNAIL_PX[1] / image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            return np.asarray(image.resize(size, Image.Resampling.LANCZOS))
    except (OSError, UnidentifiedImageError) as error:
        logger.warning("cannot read preview image %s: %s", path, error)
        return None


SECTION = ReportSection("preview", "Dataset preview", build, needs_results=False)
