"""BreakHis (Spanhol et al., IEEE TBME 2016) as a data source: recognised by its file-name grammar.

The layout and the grammar (``SOB_<B|M>_<TT>-<YY>-<ID>-<MAG>-<SEQ>.png``) live in
:mod:`histotoken.data.breakhis`; this module is the :class:`~histotoken.data.sources.DataSource`
around them. Detection reads the names of image files actually present (a sample of the first
``DETECT_SAMPLE`` in sorted order) and never the folder names: a tile set sorted into ``benign/``
and ``malignant/`` folders is an ImageFolder tree, not BreakHis.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from histotoken.data.breakhis import find_breast_root, parse_file_name
from histotoken.data.decode import IMAGE_SUFFIXES, decode_image, size_or_skip
from histotoken.data.sources import INDEX_COLUMNS, DataSource, IndexResult, SourceWords

if TYPE_CHECKING:
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)

DETECT_SAMPLE = 64  # image files whose names are read to recognise BreakHis


def sample_image_names(root: Path, limit: int = DETECT_SAMPLE) -> list[str]:
    """Names of the first ``limit`` image files below ``root`` (sorted walk, hidden folders skipped)."""
    names: list[str] = []
    for _folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.lower().endswith(IMAGE_SUFFIXES):
                names.append(name)
                if len(names) >= limit:
                    return names
    return names


def scan_breakhis(data_root: str | Path, check_images: bool = True) -> IndexResult:
    """Walk a BreakHis tree once and return one row per usable image.

    Files whose names do not parse, or that are not readable RGB-convertible images, are left
    out and listed in ``skipped`` with the reason; nothing is written.
    """
    import pandas as pd

    try:
        breast = find_breast_root(data_root)
    except FileNotFoundError:
        breast = Path(data_root).expanduser()  # BreakHis file names without the BreakHis folders
        if not breast.is_dir():
            raise
    rows, skipped = [], []
    for path in sorted(_image_files(breast.rglob("*"))):
        try:
            parsed = parse_file_name(path)
        except ValueError as error:
            skipped.append((str(path), str(error)))
            continue
        size = size_or_skip(path, check_images, skipped)
        if size is None:
            continue
        width, height = size
        rows.append(
            {
                "path": str(path.resolve()),
                "patient_id": parsed.patient_id,
                "tumor_class": parsed.tumor_class,
                "label": parsed.label,
                "magnification": parsed.magnification,
                "width": width,
                "height": height,
            }
        )
    frame = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    if frame.empty:
        raise ValueError(
            f"no BreakHis images found below {breast} (names like SOB_B_A-14-22549AB-100-001.png); check the "
            "folder, or give --data-format imagefolder for a tree with one folder of images per class"
        )
    for path, reason in skipped:
        logger.warning("left out %s: %s", path, reason)
    return IndexResult(frame, skipped)


def _image_files(paths: Iterable[Path]) -> Iterable[Path]:
    return (p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class BreakHisSource:
    name = "breakhis"
    words = SourceWords()
    decodes_images = True
    key_suffix = ""

    def detect(self, root: Path) -> bool:
        """At least half of the sampled image file names follow the BreakHis grammar."""
        names = sample_image_names(root)
        parsed = 0
        for name in names:
            try:
                parse_file_name(name)
                parsed += 1
            except ValueError:
                pass
        return bool(names) and 2 * parsed >= len(names)

    def scan(self, root: Path, groups: str | Path | None = None) -> IndexResult:
        return scan_breakhis(root)

    def read(self, key: str) -> torch.Tensor:
        return decode_image(key)

    def classes(
        self, task: str, root: Path | None = None, frame: pd.DataFrame | None = None
    ) -> tuple[tuple[str, ...], str]:
        """``binary`` -> (benign, malignant) in ``label``; ``subtype``/``classes`` -> 8 subtypes in ``tumor_class``."""
        from histotoken.data.breakhis import class_names

        if task == "binary":
            return class_names("binary"), "label"
        return class_names("subtype"), "tumor_class"

    def rebase(self, frame: pd.DataFrame, new_root: Path) -> pd.DataFrame:
        """Keep each path's part below ``breast`` and put it below the new copy's ``breast`` folder."""
        breast = find_breast_root(new_root)

        def moved(path: str) -> str:
            parts = Path(path).parts
            if "breast" not in parts:
                raise ValueError(
                    f"split path {path} is not inside a BreakHis 'breast' folder; cannot move it to {breast}"
                )
            return str(breast.joinpath(*parts[len(parts) - parts[::-1].index("breast"):]))

        frame = frame.copy()
        frame["path"] = frame["path"].map(moved)
        return frame


SOURCE: DataSource = BreakHisSource()
